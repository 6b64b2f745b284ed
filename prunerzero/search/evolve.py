"""`prunerzero evolve`: genetic programming over pruning metrics (Pruner-Zero's search), with
OOS de-duplication, cached and staged (multi-fidelity) fitness, checkpoints and resume."""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from deap import tools
from .. import progress
from ..progress import say

from .cache import Cache, Measured
from ..runs.checkpoint import CheckpointError, rng_state, set_rng_state
from .gp import individual_from, individual_record
from .config import SearchConfig
from ..engine.reconstruct import Update
from .evaluator import Setup, Task
from .gp import from_text, primitive_set, toolbox, vary
from . import recipe
from ..runs.rundir import RunDir

WORST = (-1.0, math.inf)
# "Beats Wanda" needs a margin: fp32 rounding alone moves a rank-equivalent rewrite of Wanda's
# metric (e.g. log(W*X)) by ~1e-5 relative, which is not a better metric.
BEAT_MARGIN = 1e-3


@dataclass
class SearchData:
    """Token ids for calibration and for fitness: the search chunks and the held-out chunks
    (disjoint), and optionally the whole evaluation split."""
    calibration: torch.Tensor
    search: torch.Tensor
    heldout: torch.Tensor
    full: torch.Tensor | None = None
    source: str = "wikitext2"
    note: str = ""
    sequences: str = ""                  # the BOS protocol, as data.Sequences.describe() says it
    search_source: str = ""              # where the search chunks come from, when not `source`


@dataclass
class Counters:
    candidates: int = 0        # offspring (and initial trees) that needed a fitness
    evaluations: int = 0       # model evaluations run (one candidate on one chunk range)
    chunk_evals: float = 0     # chunks evaluated in total (a --screen-tokens chunk counts as its share)
    full_equivalent: int = 0   # chunks a search without staging would have evaluated
    key_hits: int = 0          # fitness found by canonical key
    mask_hits: int = 0         # fitness found by mask fingerprint (different key, same masks)
    oos_catches: int = 0       # offspring rank-equivalent to a population member, replaced
    invalid: int = 0           # candidates whose text is not a valid metric
    failures: int = 0          # candidates that failed on the model (NaN, degenerate scores, ...)
    first_beat_wanda_s: float | None = None
    elapsed_s: float = 0.0
    eval_s: float = 0.0        # seconds spent in those chunk evaluations, pruning excluded (for time estimates)
    recon_s: float = 0.0       # seconds spent pruning and reconstructing recipes (once per candidate)
    recons: int = 0            # recipe candidates reconstructed
    sequential_s: float = 0.0  # seconds spent pruning candidates sequentially (the faithful stage)
    sequentials: int = 0       # candidates pruned sequentially
    fast_tracked: int = 0      # candidates sent past a mask-only stage's ranking by --fast-track


def same_key(a, b) -> bool:
    """Hall-of-fame similarity: rank-equivalent metrics count once."""
    return a.key == b.key


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


@dataclass
class Search:
    config: SearchConfig
    run: RunDir
    pool: object
    quiet: bool = False
    cache: Cache = field(default_factory=Cache)
    counters: Counters = field(default_factory=Counters)
    sizes: dict | None = None      # weights of each prunable layer: what an allocation genome spreads

    def __post_init__(self):
        c = self.config
        self.pset = primitive_set(c.terminals, c.operators)
        self.tb = toolbox(self.pset, c.init_depth, c.max_height, c.tournament)
        self.stages = list(c.stages)
        self.population, self.gen, self.reference = [], 0, {}
        self.hof = tools.HallOfFame(c.hof_size, similar=same_key)
        self.logbook = tools.Logbook()
        self.stats = tools.Statistics(key=lambda ind: ind.first)
        self.stats.register("median", np.nanmedian)
        self.stats.register("min", np.nanmin)
        self.alloc = None
        if c.searches("allocation"):
            if not self.sizes:
                raise ValueError("a search over allocations needs the layer sizes (Search.sizes)")
            self.alloc = recipe.AllocationGenes(self.sizes, c.sparsity)

    # ------------------------------------------------------------------ candidates
    def key(self, ind) -> str | None:
        """A candidate's cache key: its metric's canonical key and, when the update is searched,
        its update spec (a metric text stands for itself with --update's settings)."""
        mkey = self.cache.describe(str(ind))[1]
        if mkey is None:
            return None
        if self.config.searches("update"):
            mkey += f" | {self.update_of(ind)}"
        if self.alloc is not None:
            mkey += f" | {self.alloc_of(ind)}"
        return mkey

    def update_of(self, ind) -> str:
        """The update spec a candidate is reconstructed with: its own, else --update's."""
        return getattr(ind, "update", None) or self.config.update

    def alloc_of(self, ind) -> str | None:
        """A candidate's allocation genome as text (uniform: all '0'), when allocations are searched."""
        if self.alloc is None:
            return None
        return getattr(ind, "alloc", None) or self.alloc.text(self.alloc.start)

    def layer_sparsity(self, ind) -> dict | None:
        """The sparsity of each layer under a candidate's allocation; None: uniform."""
        text = self.alloc_of(ind)
        return None if text is None or set(text) == {"0"} else self.alloc.sparsity_of(text)

    def _new(self):
        """A fresh candidate: a random tree (the first seed metric when the metric is frozen) with
        random update settings when those are searched."""
        c = self.config
        ind = self.tb.individual() if c.searches("metric") else from_text(c.seed_metrics[0], self.pset)
        ind.update = recipe.fresh(c.update, fixed=c.fixed_settings) if c.searches("update") else c.update
        if self.alloc is not None:
            ind.alloc = self.alloc.fresh()
        return ind

    def _valid_fresh(self, taken: set):
        """A fresh candidate that is a valid metric with a key not in `taken`."""
        for _ in range(200):
            ind = self._new()
            key = self.key(ind)
            if key is not None and key not in taken:
                return ind
        return ind

    def initial(self) -> list:
        pop, taken = [], set()
        for text in self.config.seed_metrics:
            ind = from_text(text, self.pset)
            ind.update = self.config.update
            if self.alloc is not None:
                ind.alloc = self.alloc.text(self.alloc.start)
            if self.key(ind) not in taken:
                pop.append(ind)
                taken.add(self.key(ind))
        while len(pop) < self.config.population:
            ind = self._valid_fresh(taken)
            pop.append(ind)
            taken.add(self.key(ind))
        return pop

    def offspring(self, n: int) -> list:
        """n new candidates: varied from tournament winners (or fresh trees for random search);
        any whose canonical key is already in the population, or taken by an earlier
        offspring, is replaced by a fresh valid tree (OOS keeps the population diverse)."""
        c = self.config
        taken = {self.key(i) for i in self.population}
        if c.strategy == "random":
            kids = [self._new() for _ in range(n)]
        else:
            parents = self.tb.select(self.population, n)
            kids = vary(parents, self.tb, c.cxpb, c.mutpb) if c.searches("metric") else \
                [self.tb.clone(p) for p in parents]
            # with the metric frozen, only the other parts can change: every child mutates them
            mutpb = c.mutpb if c.searches("metric") else 1.0
            if c.searches("update"):
                self._vary_updates(kids, c.cxpb, mutpb)
            if self.alloc is not None:
                for kid in kids:   # no crossover: swapping levels would break the exact total
                    if random.random() < mutpb:
                        kid.alloc = self.alloc.mutate(self.alloc_of(kid))
        out = []
        for kid in kids:
            key = self.key(kid)
            if key in taken:
                self.counters.oos_catches += 1
                kid = self._valid_fresh(taken)
                key = self.key(kid)
            del kid.fitness.values
            taken.add(key)
            out.append(kid)
        return out

    def _vary_updates(self, kids: list, cxpb: float, mutpb: float):
        """The update part of variation: neighbours cross their settings, then each may mutate."""
        fixed = self.config.fixed_settings
        for a, b in zip(kids[::2], kids[1::2]):
            if random.random() < cxpb:
                a.update, b.update = recipe.cross(self.update_of(a), self.update_of(b), fixed=fixed)
        for kid in kids:
            if random.random() < mutpb:
                kid.update = recipe.mutate(self.update_of(kid), fixed=fixed)

    # ------------------------------------------------------------------ fitness
    def evaluate(self, inds: list, desc: str = ""):
        """Staged fitness: everyone on the first stage's chunks, the best `promote` fraction on
        to the next stage's, and so on. Fitness = (last stage reached, perplexity there)."""
        self.counters.candidates += len(inds)
        self.counters.full_equivalent += len(inds) * self.stages[-1]
        alive = []
        for ind in inds:
            ind.first, ind.fast_tracked = math.nan, False
            simplified, _, error = self.cache.describe(str(ind))
            ind.key = self.key(ind)
            if error:
                self.counters.invalid += 1
                ind.fitness.values = WORST
            else:
                alive.append(ind)
        for s, k in enumerate(self.stages):
            ppl = self._measure(alive, k, f"{desc} stage {s + 1}/{len(self.stages)} ({self.stage_what(s)})",
                                **self.how(s))
            ok = []
            for ind in alive:
                p = ppl[self.key(ind)]
                ind.fitness.values = (float(s), p) if math.isfinite(p) else WORST
                if s == 0:
                    ind.first = p if math.isfinite(p) else math.nan
                if math.isfinite(p):
                    ok.append(ind)
            keep = max(1, math.ceil(len(ok) * self.config.promote)) if s + 1 < len(self.stages) else 0
            ranked = sorted(ok, key=lambda i: i.fitness.values[1])
            alive = ranked[:keep] + self._fast_track(ranked[keep:], keep, s)
        self.counters.fast_tracked += sum(bool(getattr(i, "fast_tracked", False)) for i in inds)

    def mask_of(self, ind) -> tuple:
        """What decides a candidate's mask: its metric's canonical key and its allocation."""
        return self.cache.describe(str(ind))[1], self.alloc_of(ind)

    def _fast_track(self, passed_over: list, limit: int, stage: int) -> list:
        """With --fast-track, the candidates the ranking of a mask-only stage passed over that keep
        the mask of a hall-of-fame recipe and change only its update: that stage can only repeat the
        verdict on a mask the last stage already judged good, so they go on to the update's own
        test, at most `limit` of them (as many as the ranking promoted), best mask first."""
        c = self.config
        # (the config refuses --fast-track unless the update is searched)
        if not c.fast_track or stage + 1 == len(self.stages) or c.stage_mode(stage) != "mask" or not len(self.hof):
            return []
        proven = {}
        for rank, ind in enumerate(self.hof):
            proven.setdefault(self.mask_of(ind), rank)
        chosen = [i for i in passed_over if self.mask_of(i) in proven]
        chosen.sort(key=lambda i: proven[self.mask_of(i)])   # stable: the stage's own order within a mask
        for ind in chosen[:limit]:
            ind.fast_tracked = True
        return chosen[:limit]

    def how(self, stage: int) -> dict:
        """_measure's arguments for how `stage` prunes its candidates."""
        return dict(recon=self.config.reconstructs(stage), seq=self.config.sequential(stage),
                    screen=self.config.screens(stage))

    def stage_what(self, stage: int) -> str:
        c = self.config
        mode = c.stage_mode(stage)
        what = f"{self.stages[stage]} chunks"
        if c.screens(stage):
            what += f" of {c.screen_tokens} tokens"
        if mode == "sequential":
            return what + ", sequential" + (f" with {c.update}" if c.update != "none" else "")
        return what + (f", {c.update}" if mode == "one-shot" else "")

    def _measure(self, inds, k: int, desc: str, tag=None, recon: bool = False, seq: bool = False,
                 screen: bool = False) -> dict:
        """Perplexity on the first k search chunks of every distinct key among `inds`, of the
        masks alone, (recon) of the recipe with its update, or (seq) pruned as apply prunes;
        (screen) on the first --screen-tokens of each chunk, measured and cached apart."""
        value, tasks, entries = {}, [], []   # per cache entry: several candidates may share one
        known = self.cache.known()  # fingerprints measured before this batch, shared by its tasks
        where = []
        for ind in inds:
            simplified, mkey, _ = self.cache.describe(str(ind))
            spec, alloc = self.update_of(ind), self.alloc_of(ind)
            entry = self.entry(mkey, recon, seq, spec) + (f" @{alloc}" if alloc and set(alloc) != {"0"} else "")
            entry += f" screen{self.config.screen_tokens}" if screen else ""
            where.append((self.key(ind), entry))
            if entry in value or entry in entries:
                self.counters.key_hits += 1
                continue
            m = self.cache.measured(entry)
            if self.cache.failure(entry):
                value[entry] = math.inf
            elif m is not None and m.done >= k:
                self.counters.key_hits += 1
                value[entry] = m.perplexity(k)
            else:
                entries.append(entry)
                tasks.append(Task(simplified, m.done if m else 0, k, "screen" if screen else "search", known,
                                  reconstruct=recon,
                                  sequential=seq, update=spec if recon or seq else None,
                                  allocation=self.layer_sparsity(ind)))
        bar = progress.bar(total=len(tasks), desc=desc.strip(), enabled=not self.quiet and bool(tasks), done_line=False)
        results = self.pool.map(tasks, on_result=lambda r: bar.update())
        bar.close()
        for entry, task, r in zip(entries, tasks, results):
            value[entry] = self._record(entry, task, r, k, self.gen if tag is None else tag)
        return {key: value[entry] for key, entry in where}

    def chunk_share(self, task) -> float:
        """What one chunk of a task weighs against a whole search chunk: its share of the tokens
        (the time estimates price chunks at the measured seconds per whole chunk)."""
        c = self.config
        return c.screen_tokens / c.seqlen if task.chunks == "screen" else 1.0

    def entry(self, key: str, recon: bool, seq: bool = False, update: str | None = None) -> str:
        """The cache entry of a metric key: the mask alone, the recipe reconstructed one-shot and
        the candidate pruned sequentially are measured apart, each recipe with its own update."""
        update = update or self.config.update
        if seq:
            return f"{key} sequential" + (f" +{update}" if update != "none" else "")
        return f"{key} +{update}" if recon else key

    def _record(self, key, task, r, k, gen) -> float:
        if r.error:
            self.counters.failures += 1
            self.cache.by_key[key] = "!" + r.error
            self.run.append("failures.jsonl", dict(gen=gen, metric=task.text, key=key, error=r.error))
            return math.inf
        self.cache.by_key[key] = r.fingerprint
        m = self.cache.by_fp.setdefault(r.fingerprint, Measured())
        if r.cached:
            self.counters.mask_hits += 1
        elif m.add(r.lo, r.hi, r.nll, r.tokens):
            self.counters.evaluations += 1
            self.counters.chunk_evals += (r.hi - r.lo) * self.chunk_share(task)
            self.counters.eval_s += r.seconds - r.prune_s
            if task.sequential:
                self.counters.sequential_s += r.prune_s
                self.counters.sequentials += 1
            elif task.reconstruct:
                self.counters.recon_s += r.prune_s
                self.counters.recons += 1
        ppl = m.perplexity(k) if m.done >= k else math.inf
        self.run.append("evaluations.jsonl", dict(gen=gen, metric=task.text, key=key, fingerprint=r.fingerprint,
                                                  chunks=[r.lo, r.hi], cached=r.cached, perplexity=_finite(ppl),
                                                  update=(task.update or self.config.update)
                                                  if task.reconstruct or task.sequential else "none",
                                                  sequential=task.sequential,
                                                  seconds=round(r.seconds, 3)))
        return ppl

    # ------------------------------------------------------------------ generations
    def step(self):
        c = self.config
        t0 = time.perf_counter()
        if self.gen == 0:
            self.population = self.initial()
            new = self.population
            self.evaluate(new, f"gen {self.gen}")
        else:
            elites = tools.selBest(self.population, c.elite)
            new = self.offspring(c.population - c.elite)
            self.evaluate(new, f"gen {self.gen}")
            self.population = elites + new
        self.hof.update([i for i in self.population if i.fitness.values[0] == len(self.stages) - 1])
        self.counters.elapsed_s += time.perf_counter() - t0
        self._note_first_beat()
        record = self._record_generation(new, time.perf_counter() - t0)
        self.gen += 1
        return record

    def _note_first_beat(self):
        wanda = self.reference.get("wanda")
        if wanda and self.counters.first_beat_wanda_s is None and len(self.hof) and \
                self.hof[0].fitness.values[1] < wanda * (1 - BEAT_MARGIN):
            self.counters.first_beat_wanda_s = self.counters.elapsed_s

    def _record_generation(self, new, seconds) -> dict:
        stats = self.stats.compile(new)
        best = self.hof[0] if len(self.hof) else None
        cn = self.counters
        record = dict(gen=self.gen, best=_finite(best.fitness.values[1]) if best else None,
                      best_metric=self.cache.describe(str(best))[0] if best else None,
                      best_update=self.update_of(best) if best else None,
                      best_allocation=self.alloc_of(best) if best else None,
                      median_first_stage=_finite(float(stats["median"])), min_first_stage=_finite(float(stats["min"])),
                      distinct_candidates=len(self.cache.by_key), distinct_masks=len(self.cache.by_fp),
                      candidates=cn.candidates, evaluations=cn.evaluations, chunk_evals=cn.chunk_evals,
                      chunks_without_staging=cn.full_equivalent, key_hits=cn.key_hits, mask_hits=cn.mask_hits,
                      oos_catches=cn.oos_catches, invalid=cn.invalid, failures=cn.failures,
                      seconds=round(seconds, 2), elapsed_s=round(cn.elapsed_s, 2),
                      first_beat_wanda_s=cn.first_beat_wanda_s)
        self.logbook.record(**record)
        self.run.append("log.jsonl", record)
        if not self.quiet:
            say(f"gen {self.gen:3d}  best {record['best'] or math.inf:9.3f}  "
                f"median(stage 1) {record['median_first_stage'] or math.inf:9.3f}  "
                f"distinct {record['distinct_candidates']:4d}  evals {cn.evaluations:4d}  "
                f"hits {cn.key_hits + cn.mask_hits:3d}  oos {cn.oos_catches:3d}  "
                f"{seconds:6.1f}s  {record['best_metric']}")
        return record

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        """Everything a resumed run needs, as plain JSON data (see checkpoint.py)."""
        c = self.cache
        return dict(gen=self.gen, population=[individual_record(i) for i in self.population],
                    hof=[individual_record(i) for i in self.hof.items], logbook=list(self.logbook),
                    cache=dict(meta=c.meta, by_key=c.by_key, by_fp={fp: m.segments for fp, m in c.by_fp.items()}),
                    counters=asdict(self.counters), reference=self.reference, rng=rng_state())

    def restore(self, state: dict):
        self.gen = state["gen"]
        self.population = [self._checked(individual_from(r, self.pset)) for r in state["population"]]
        items = [self._checked(individual_from(r, self.pset)) for r in state["hof"]]
        # DEAP's HallOfFame keeps its items best first and their fitnesses in ascending order
        self.hof.items, self.hof.keys = items, [i.fitness for i in reversed(items)]
        self.logbook = tools.Logbook()
        for record in state["logbook"]:
            self.logbook.record(**record)
        c = state["cache"]
        self.cache = Cache(meta={t: tuple(v) for t, v in c["meta"].items()}, by_key=dict(c["by_key"]),
                           by_fp={fp: Measured([tuple(s) for s in segs]) for fp, segs in c["by_fp"].items()})
        self.counters = Counters(**state["counters"])
        self.reference = dict(state["reference"])
        set_rng_state(state["rng"])

    def _checked(self, ind):
        """A restored candidate whose allocation (if any) fits this model and keeps the total."""
        if getattr(ind, "alloc", None) is not None:
            if self.alloc is None:
                raise CheckpointError("the checkpoint holds allocations, but this search does not search them")
            try:
                self.alloc.parse(ind.alloc)
            except ValueError as e:
                raise CheckpointError(f"the checkpoint's allocation does not fit this model: {e}") from None
        return ind

    def checkpoint(self):
        self.run.save_checkpoint(self.state())
        self.run.plot(self.run.read_lines("log.jsonl"), self.reference)

    def seed_rngs(self):
        random.seed(self.config.seed)
        np.random.seed(self.config.seed)
        torch.manual_seed(self.config.seed)


def setup_for(config: SearchConfig, data: SearchData, primitive_files: dict, hessians: str | None = None) -> Setup:
    chunks = {"search": data.search, "heldout": data.heldout}
    if config.screen_tokens:
        chunks["screen"] = data.search[:, :config.screen_tokens].contiguous()
    if data.full is not None:
        chunks["full"] = data.full
    sequential = config.fitness == "sequential"
    return Setup(model=config.model, primitives=primitive_files, nsamples=len(data.calibration),
                 sparsity=config.sparsity, structure=config.structure, chunks=chunks, dtype=config.dtype,
                 device=config.device, threads=config.threads, update=asdict(Update.parse(config.update)), hessians=hessians,
                 calibration=data.calibration[:config.fitness_samples] if sequential else None)
