"""`--allocation search`: per-layer sparsities found by evolution, as EvoPress does (Sieberling
et al., 2024), on DarwinLM's search machinery (structured/search.py, structured/genome.py).

Every prunable layer has sparsity levels target + i * step (i = -levels ... levels, within
[0, max_sparsity]); a genome gives each layer a level. The level-switch mutation moves a layer
and compensates elsewhere so that the number of kept weights stays exactly the uniform
genome's; selection is staged (a (1 + offspring) evolution: few calibration windows for all
children, more for the survivors), and fitness is the KL divergence of the pruned model's
next-token distribution from the dense model's on calibration windows. The candidate masks
come from the metric's scores on the dense model (one-shot): each row's weights are sorted by
score once, and a level prunes a prefix of that order, so a candidate costs one masked forward
pass per window. The result gives `apply` each layer's sparsity (prune.apply_metric then prunes
with any update, sequentially or not, with the total exact to the weight: allocation.layer_counts).

A run folder (config.json, log.jsonl, checkpoint.json, fitness.png, allocation.json) makes the
search resumable: `apply` keeps it in the cache, keyed by its settings, so an interrupted run
continues and a finished one is reused.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..progress import say
from .. import checks
from ..engine.calibration import compute_g, compute_h, compute_x
from ..language.compile import layer_primitives, scorer
from ..engine.layers import matrix, set_matrix
from ..language.metric import Metric
from ..settings import Settings


@dataclass
class AllocationSearchConfig(Settings):
    """Settings of the allocation search; the field names are those DarwinSearch reads."""
    step: float = 0.025                 # sparsity between neighbouring levels
    levels: int = 8                     # levels on each side of the target
    max_sparsity: float = 0.95
    generations: int = 20
    offspring: int = 8
    max_switches: int = 3               # level switches per mutation (each one compensated)
    reach: int = 2                      # levels a switch may move a layer
    # (train tokens, eval tokens, survivors) per stage; no training in an allocation search
    stages: tuple = ((0, 2048, 2), (0, 8192, 1))
    seqlen: int = 512                   # set from the calibration windows
    lr: float = 0.0
    seed: int = 0
    time_limit: float | None = None
    run: str | None = None              # run folder (resumed, or reused when finished); None: temporary
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.stages = tuple(tuple(int(x) for x in s) for s in self.stages)
        self.validate()

    def validate(self):
        checks.number("step", self.step, 0, 0.5, low_open=True)
        checks.integer("levels", self.levels)
        checks.number("max_sparsity", self.max_sparsity, 0, 1, low_open=True, high_open=True)
        for name in ("generations", "offspring", "max_switches", "reach"):
            checks.integer(name, getattr(self, name))
        checks.integer("seed", self.seed, minimum=0)
        checks.number("time_limit", self.time_limit, low=0, low_open=True, optional=True)
        if not self.stages or any(len(s) != 3 or s[1] < 1 or s[2] < 1 for s in self.stages):
            raise checks.SettingsError(f"allocation stages must be (train tokens, eval tokens >= 1, survivors >= 1), "
                                       f"got {self.stages}")


def ladder(target: float, c: AllocationSearchConfig) -> list[float]:
    """The sparsity levels around the target, lowest first."""
    out = {round(target + i * c.step, 6) for i in range(-c.levels, c.levels + 1)}
    return sorted(s for s in out if 0 <= s <= c.max_sparsity)


class LevelMasks:
    """Masks of every layer at every level from one sort of the metric's dense scores: level
    sparsity s prunes the int(in * s) lowest-scoring weights of each row (of the whole layer
    for a metric compared per layer)."""

    def __init__(self, model, layers: dict, metric: Metric, samples: torch.Tensor, known: dict | None = None):
        """known: dense primitives already at hand (terminal -> per-layer tensors, e.g. G that
        apply_metric computed); the others the metric reads are computed here."""
        uses = metric.terminals
        compute = {"X": compute_x, "G": compute_g, "H": compute_h}
        stats = {t: (known or {}).get(t) for t in compute}
        stats = {t: compute[t](model, samples) if t in uses and v is None else v for t, v in stats.items()}
        fn, self.group = metric.compile(), metric.group
        self.order = {}
        for name, lin in layers.items():
            W = matrix(lin)
            scores = scorer(name, fn, layer_primitives(name, uses, stats, len(samples)))(W).float()
            if self.group == "layer":
                scores = scores.reshape(1, -1)
            kind = torch.int16 if scores.shape[1] < 2 ** 15 else torch.int32
            self.order[name] = torch.sort(scores, dim=1, stable=True).indices.to(kind)

    def mask(self, name: str, shape, sparsity: float) -> torch.Tensor:
        order = self.order[name]
        k = int(order.shape[1] * sparsity)
        m = torch.zeros(order.shape, dtype=torch.bool, device=order.device)
        m.scatter_(1, order[:, :k].long(), True)
        return m.reshape(shape)


def search_allocation(model, layers: dict, metric, samples: torch.Tensor, sparsity: float,
                      config: AllocationSearchConfig | None = None, run_path=None,
                      progress: bool = True, known: dict | None = None) -> tuple[dict[str, float], dict]:
    """(sparsity of each layer, report) found by evolution; the model is left dense. run_path:
    a folder for the run (resumed when it holds one, reused when finished); None: a
    temporary one. known: dense primitives already computed (see LevelMasks)."""
    from ..runs.rundir import RunDir
    from ..structured.fitness import DenseReference
    from ..structured.genome import LevelSpace
    from ..structured.search import DarwinSearch, FitnessData, run_loop
    c = config or AllocationSearchConfig()
    c.seqlen = samples.shape[1]
    m = Metric.parse(metric) if not isinstance(metric, Metric) else metric
    levels = ladder(sparsity, c)
    if sparsity not in levels:
        raise checks.SettingsError(f"sparsity {sparsity} is above the allocation search's max_sparsity {c.max_sparsity}")
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(run_path) if run_path else Path(tmp) / "run", "allocation")
        finished = _finished(run, c.generations)
        if finished is not None:
            return finished
        dense = {name: matrix(lin).clone() for name, lin in layers.items()}
        names = list(layers)
        space = LevelSpace([[dense[n].numel() - _pruned(dense[n], s, m.group) for s in levels] for n in names],
                           ladder=levels)
        start = tuple([levels.index(sparsity)] * len(names))
        masks = LevelMasks(model, layers, m, samples, known)
        reference = DenseReference(model, samples)
        for i in range(len(samples)):  # the dense side, before any candidate changes the weights
            reference.hidden_states(i)

        def build(genome):
            for name, lv in zip(names, genome):
                set_matrix(layers[name], dense[name].masked_fill(masks.mask(name, dense[name].shape, levels[lv]), 0))
            return model

        search = DarwinSearch(c, model, space, FitnessData(reference, samples), run, quiet=not progress,
                              build=build)
        settings = dict(c.to_dict(), metric=m.canonical(), sparsity=sparsity, levels=levels, layers=names)
        settings.pop("run")
        try:
            state = _resumable(run, settings)
            if not run.resume(search, state):
                run.create(settings)
                search.start(start)
            run_loop(search)
        finally:
            for name, lin in layers.items():
                set_matrix(lin, dense[name])
        per_layer = {n: levels[lv] for n, lv in zip(names, search.parent)}
        log_rows = run.read_lines("log.jsonl")
        report = dict(kind="search", levels=levels, generations=search.gen, evaluations=search.evaluations,
                      search_s=round(search.elapsed, 2), settings=c.to_dict(),
                      kl_uniform=log_rows[0]["parent_kl"] if log_rows else None,
                      kl_found=log_rows[-1]["kl"] if log_rows else None,
                      layer_sparsity={n: round(s, 6) for n, s in per_layer.items()})
        run.write_json("allocation.json", dict(sparsity=per_layer, report=report))
        run.release()
        return per_layer, report


def _finished(run, generations: int):
    """(sparsities, report) of a finished run in this folder with at least `generations`; a
    finished run with fewer is unmarked, so that it continues from its checkpoint."""
    done = run.path / "allocation.json"
    if not done.is_file():
        return None
    result = json.loads(done.read_text())
    if result["report"]["generations"] >= generations:
        say(f"allocation search: reusing the finished run in {run.path}")
        return result["sparsity"], result["report"]
    done.unlink()
    return None


def _resumable(run, settings: dict):
    """The folder's checkpoint when it continues a run of these settings (the folder then held
    by this process); None, with the folder cleared, when there is nothing to keep: no
    checkpoint yet, or one of an older prunerzero or damaged. Other settings are refused."""
    from ..runs.checkpoint import CheckpointError
    state = run.load_checkpoint()
    saved = None
    if state is not None:
        try:
            saved = run.config()
        except CheckpointError as e:
            say(f"allocation search: discarding the run in {run.path} ({e})")
            state = None
    if state is None:
        if run.path.exists():
            shutil.rmtree(run.path)
        return None
    if differ := _unlike(saved, settings):
        raise checks.SettingsError(f"the allocation run in {run.path} was made with other settings "
                                   f"({differ}); give another folder")
    run.hold()
    return state


def _unlike(saved: dict, settings: dict) -> str:
    """The settings that differ from a run folder's, as text ("" when none do)."""
    keys = [k for k in settings if k != "time_limit" and k != "generations" and saved.get(k) != _plain(settings[k])]
    return ", ".join(keys)


def _plain(value):
    return json.loads(json.dumps(value))


def _pruned(W: torch.Tensor, sparsity: float, group: str) -> int:
    """Weights a level prunes in W: int(in * s) per row, or int(numel * s) for the whole layer."""
    return int(W.numel() * sparsity) if group == "layer" else W.shape[0] * int(W.shape[1] * sparsity)
