"""Genomes over the level database: one level index per module (attention of every layer,
then MLP of every layer), their parameter counts, the uniform starting point, the
level-switch mutation that keeps the parameter count *exactly*, and an allocation by
per-layer error (the non-evolved baseline).

DarwinLM's own mutation keeps the sum of level indices fixed; with uneven level sizes
(a key-value head leaving with its last query head, channel counts rounded to a multiple)
that lets the parameter count drift. Here each switch is paired with compensating switches
whose parameter changes cancel it to the last parameter.
"""
from __future__ import annotations

import math
import random
from functools import reduce

import numpy as np

from .database import Database
from .units import StructureError

Genome = tuple[int, ...]


class LevelSpace:
    """Modules with levels, each level a parameter count (`cost`) and an error estimate. DarwinLM's
    modules are attention and MLP of every block (`of_database`); an allocation search's are the
    prunable layers at sparsity levels (search/allocation.py)."""

    def __init__(self, cost: list[list[int]], error: list[list[float]] | None = None, ladder=(), db: Database | None = None):
        self.cost = cost
        self.error = error if error is not None else [[0.0] * len(c) for c in cost]
        self.ladder, self.db = tuple(ladder), db
        self.modules = None

    @classmethod
    def of_database(cls, db: Database) -> "LevelSpace":
        modules = db.levels["attn"] + db.levels["mlp"]
        space = cls([[lv.params for lv in mod] for mod in modules], [[lv.error for lv in mod] for mod in modules],
                    db.ladder, db)
        space.modules, space.n_layers = modules, db.n_layers
        space.kinds = ["attn"] * db.n_layers + ["mlp"] * db.n_layers
        return space

    @property
    def dense(self) -> Genome:
        return (0,) * len(self.modules)

    def params(self, genome: Genome) -> int:
        return sum(c[g] for c, g in zip(self.cost, genome))

    @property
    def total(self) -> int:
        return self.params(self.dense)

    def target_params(self, target: float) -> int:
        """A fraction (0, 1] of the prunable parameters kept, or an absolute count."""
        count = round(target * self.total) if target <= 1 else int(target)
        if not 0 < count <= self.total:
            raise StructureError(f"target {target} is unreachable: give a fraction in (0, 1] of the "
                                 f"{self.total:,} prunable parameters kept, or a count up to {self.total:,}")
        return count

    def uniform(self, target: float) -> Genome:
        """Every module at the ladder fraction whose total is nearest the target."""
        want = self.target_params(target)
        best = min((self._uniform_at(f) for f in self.ladder), key=lambda g: abs(self.params(g) - want))
        got = self.params(best)
        step = self.total / max(1, len(self.ladder) - 1)
        if abs(got - want) > step / 2 + 1:
            raise StructureError(f"target {target} is unreachable with ladder {self.ladder}: the nearest "
                                 f"uniform configuration keeps {got:,} of {self.total:,} parameters")
        return best

    def _uniform_at(self, fraction: float) -> Genome:
        out = []
        for mod in self.modules:
            full = len(mod[0].kept)
            out.append(min(range(len(mod)), key=lambda i: (abs(len(mod[i].kept) - full * (1 - fraction)), i)))
        return tuple(out)

    # -- mutation ---------------------------------------------------------------------------
    def _moves(self, genome, exclude, reach):
        """parameter change -> [(module, new level)] for every switch within `reach` levels."""
        table: dict[int, list[tuple[int, int]]] = {}
        for m, (costs, g) in enumerate(zip(self.cost, genome)):
            if m in exclude:
                continue
            for lv in range(max(0, g - reach), min(len(costs), g + reach + 1)):
                if lv != g:
                    table.setdefault(costs[lv] - costs[g], []).append((m, lv))
        return table

    def compensations(self, genome: Genome, delta: int, exclude, reach: int = 2, limit: int = 64):
        """Sets of one or two switches (other modules) whose parameter changes sum to `delta`."""
        table = self._moves(genome, exclude, reach)
        found = [[mv] for mv in table.get(delta, [])]
        if found:
            return found
        for d1, moves in table.items():
            for a in moves:
                for b in table.get(delta - d1, []):
                    if b[0] != a[0] and a < b:
                        found.append([a, b])
                        if len(found) >= limit:
                            return found
        return found

    def mutate(self, genome: Genome, rng: random.Random, switches: int = 1, reach: int = 2,
               tries: int = 100) -> Genome:
        """Level-switch mutation: move `switches` modules by up to `reach` levels, each paired with
        compensating switches elsewhere so the parameter count is unchanged."""
        g = list(genome)
        for _ in range(switches):
            for _ in range(tries):
                m = rng.randrange(len(g))
                choices = [lv for lv in range(max(0, g[m] - reach), min(len(self.cost[m]), g[m] + reach + 1))
                           if lv != g[m]]
                if not choices:
                    continue
                lv = rng.choice(choices)
                comp = self.compensations(g, self.cost[m][g[m]] - self.cost[m][lv], {m}, reach)
                if comp:
                    g[m] = lv
                    for j, lj in rng.choice(comp):
                        g[j] = lj
                    break
        out = tuple(g)
        assert self.params(out) == self.params(genome)
        return out

    # -- the non-evolved baseline -----------------------------------------------------------
    def by_error(self, params: int, max_states: int = 4_000_000) -> Genome:
        """The levels with the least summed relative layer error at exactly `params` parameters
        (a knapsack over parameter units; the per-layer-error allocation baseline)."""
        unit = reduce(math.gcd, (c for costs in self.cost for c in costs if c), 0) or 1
        if params % unit:
            raise StructureError(f"{params:,} parameters is not a multiple of the level size unit {unit}")
        S = params // unit
        if S * len(self.cost) > max_states * 64:
            raise StructureError("too many parameter units for an exact allocation; use a coarser --multiple")
        best = np.full(S + 1, np.inf)
        best[0] = 0.0
        choice = np.zeros((len(self.cost), S + 1), dtype=np.int16)
        for m, (costs, errs) in enumerate(zip(self.cost, self.error)):
            new = np.full(S + 1, np.inf)
            for lv, (c, e) in enumerate(zip(costs, errs)):
                k = c // unit
                if k > S:
                    continue
                cand = best[:S + 1 - k] + e
                better = cand < new[k:]
                new[k:][better] = cand[better]
                choice[m, k:][better] = lv
            best = new
        if not np.isfinite(best[S]):
            raise StructureError(f"no combination of levels keeps exactly {params:,} parameters")
        out, s = [], S
        for m in range(len(self.cost) - 1, -1, -1):
            lv = int(choice[m, s])
            out.append(lv)
            s -= self.cost[m][lv] // unit
        return tuple(reversed(out))
