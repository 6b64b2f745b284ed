"""The DEAP side of the metric search: a primitive set read from primitives/search_space.toml,
the variation operators, and metric text <-> DEAP tree conversion.

The creator classes are made once at import, so trees travel to worker processes by pickle
(between this run's own processes; checkpoints hold metric texts, see checkpoint.py)."""
from __future__ import annotations

import operator
import random

from deap import algorithms, base, creator, gp, tools

from ..errors import MetricError
from ..language.text import parse
from ..language.space import load_space

if not hasattr(creator, "StagedFitness"):
    # (highest evaluation stage reached, perplexity there): compared lexicographically, so a
    # candidate that survived more stages beats one that did not, whatever its early score
    creator.create("StagedFitness", base.Fitness, weights=(1.0, -1.0))
if not hasattr(creator, "MetricTree"):
    creator.create("MetricTree", gp.PrimitiveTree, fitness=creator.StagedFitness)


def _never_called(*args):
    raise RuntimeError("metric trees are compiled by prunerzero.language.compile, not by DEAP")


def primitive_set(terminals=None, operators=None, constants=None) -> gp.PrimitiveSet:
    """DEAP primitives named exactly like the metric language's, so str(tree) is metric text."""
    space = load_space()
    search = space.search
    terminals = list(terminals or search["terminals"])
    operators = list(operators or search["operators"])
    constants = list(search.get("constants", []) if constants is None else constants)
    bad = [t for t in terminals if t not in space.terminals] + [o for o in operators if o not in space.operators]
    if bad:
        raise MetricError(f"not in primitives/search_space.toml: {', '.join(bad)}")
    if "W" not in terminals:
        raise MetricError("the search needs the W terminal")
    pset = gp.PrimitiveSet("metric", len(terminals))
    pset.renameArguments(**{f"ARG{i}": t for i, t in enumerate(terminals)})
    for name in operators:
        pset.addPrimitive(_never_called, space.operators[name].arity, name=name)
    for c in constants:
        pset.addTerminal(float(c))
    return pset


def toolbox(pset, init_depth=(1, 3), max_height=6, tournament=3) -> base.Toolbox:
    """Ramped half-and-half initialisation, tournament selection, one-point subtree crossover,
    subtree or node mutation (even odds), all under a static height limit against bloat."""
    tb = base.Toolbox()
    tb.register("expr", gp.genHalfAndHalf, pset=pset, min_=init_depth[0], max_=init_depth[1])
    tb.register("individual", tools.initIterate, creator.MetricTree, tb.expr)
    tb.register("select", tools.selTournament, tournsize=tournament)
    tb.register("mate", gp.cxOnePoint)
    tb.register("expr_mut", gp.genFull, min_=0, max_=2)
    tb.register("mutate_subtree", gp.mutUniform, expr=tb.expr_mut, pset=pset)
    tb.register("mutate_node", gp.mutNodeReplacement, pset=pset)
    limit = gp.staticLimit(key=operator.attrgetter("height"), max_value=max_height)
    for name in ("mate", "mutate_subtree", "mutate_node"):
        tb.decorate(name, limit)
    tb.register("mutate", lambda ind: (tb.mutate_subtree if random.random() < 0.5 else tb.mutate_node)(ind))
    return tb


def vary(parents, tb, cxpb: float, mutpb: float):
    """Offspring by DEAP's varAnd (crossover then mutation; changed ones lose their fitness)."""
    return algorithms.varAnd(parents, tb, cxpb, mutpb)


def from_text(text: str, pset) -> gp.PrimitiveTree:
    """A DEAP tree of a metric (text or catalog name), if it uses only the search's primitives."""
    space = load_space()
    expr = space.catalog[text].expr if text in space.catalog else text
    node = parse(expr)
    missing = sorted({n for n in _names(node) if n not in pset.mapping})
    if missing:
        raise MetricError(f"seed metric '{text}' uses {', '.join(missing)}, outside the search space")
    return creator.MetricTree(gp.PrimitiveTree.from_string(str(node), pset))


def _names(node):
    """Operator and terminal names of a tree (constants are allowed whatever their value)."""
    if node.name != "const":
        yield node.name
    for a in node.args:
        yield from _names(a)


# ---- trees in a checkpoint (runs/checkpoint.py holds data only) ----------------------------

def individual_record(ind) -> dict:
    return dict(text=str(ind), fitness=list(ind.fitness.values) if ind.fitness.valid else None,
                key=getattr(ind, "key", None), first=getattr(ind, "first", None), update=getattr(ind, "update", None),
                alloc=getattr(ind, "alloc", None))


def individual_from(record: dict, pset):
    """A tree from its text through prunerzero's parser (DEAP's own from_string would eval
    tokens it does not know), with its fitness and attributes."""
    ind = from_text(record["text"], pset)
    if record["fitness"] is not None:
        ind.fitness.values = tuple(record["fitness"])
    ind.key, ind.first = record["key"], record["first"]
    if record.get("update") is not None:
        from ..engine.reconstruct import Update
        ind.update = Update.parse(record["update"]).spec()   # checked like any typed spec
    if record.get("alloc") is not None:
        ind.alloc = str(record["alloc"])   # checked against the model by the search (Search._checked)
    return ind
