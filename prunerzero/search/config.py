"""Settings of a metric search, every default written to RUN/config.json."""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import checks
from ..engine.masks import resolve_sparsity
from ..engine.reconstruct import Update
from ..settings import Settings
from .recipe import SETTINGS


class SearchConfigError(checks.SettingsError):
    pass


@dataclass
class SearchConfig(Settings):
    # what is pruned, and how fitness is measured
    model: str | None = None                 # HF id or folder; None: the bundled SmolLM2-135M
    sparsity: float | None = None            # None: 0.5 unstructured, N/M for N:M
    structure: str = "unstructured"          # unstructured, 2:4, 4:8
    nsamples: int = 32                       # calibration samples for X, G, H
    seqlen: int = 512
    calibration: str = "wikipedia"
    search_data: str | None = None           # None: WikiText-2 test (held-out Wikipedia if missing);
                                             # wikipedia-heldout: search on held-out Wikipedia, report on WikiText-2
    update: str = "none"                     # the recipe's reconstruction: none, obs, obs-adaptive, admm
    proxy_stages: int = 1                    # with an update: leading stages ranked by the mask alone (cheap)
    fitness: str | None = None               # how the last stage prunes: "one-shot" (every layer from the dense
                                             # model's statistics) or "sequential" (as `apply` prunes: block by
                                             # block through the pruned earlier blocks); None: sequential with an
                                             # update (its gain must survive as users get it), else one-shot
    fitness_samples: int | None = None       # calibration windows of the sequential stage (None: --nsamples);
                                             # fewer is a cheaper, lower-fidelity sequential stage
    search: tuple[str, ...] = ("metric",)    # the parts of a candidate that evolve: metric, update (the
                                             # reconstruction's settings, from --update's), allocation (a
                                             # sparsity per block and layer kind, exact total); the rest frozen
    fixed_settings: tuple[str, ...] = ()     # update settings kept as --update gives them while the rest of the
                                             # update evolves (e.g. percdamp, iters)
    fast_track: bool = False                 # candidates that keep a hall-of-fame recipe's mask and change only
                                             # its update skip the mask-only stages' ranking (which can only
                                             # repeat that mask's verdict), as many as the ranking promotes
    stage_check: int = 0                     # before generation 0, score this many varied candidates on every
                                             # stage and write how each stage ranks like the last (Spearman)
    data_dir: str | None = None
    bos: str = "auto"                        # BOS per sequence: auto (as the tokenizer does), always, never
    stages: tuple[int, ...] = (1, 4, 16)     # search chunks seen by candidates reaching each stage
    screen_tokens: int | None = None         # the first stage scores the first this many tokens of each of its
                                             # chunks: a cheaper screen, to be checked with --stage-check
    promote: float = 0.25                    # fraction of a stage's candidates that go on to the next
    heldout_chunks: int = 64                 # final re-evaluation, disjoint from the search chunks
    heldout_full: bool = False               # also the whole test split at the end (slow on a CPU)
    # the genetic programme
    strategy: str = "evolution"              # or "random": fresh trees each generation, same budget
    population: int = 20
    generations: int = 15
    elite: int = 2
    tournament: int = 3
    cxpb: float = 0.7
    mutpb: float = 0.3
    init_depth: tuple[int, int] = (1, 3)
    max_height: int = 6
    terminals: tuple[str, ...] | None = None  # None: [search] of primitives/search_space.toml
    operators: tuple[str, ...] | None = None
    seed_metrics: tuple[str, ...] = ()       # e.g. ("wanda", "magnitude"); off: search from scratch
    hof_size: int = 5
    baselines: tuple[str, ...] = ("magnitude", "wanda", "obs", "pruner-zero")
    seed: int = 0
    time_limit: float | None = None          # seconds for the whole run (set-up, generations, final scoring)
    # where evaluations run
    workers: int = 1
    threads: int | None = None               # torch threads per worker (None: torch's default)
    ray: bool = False
    ray_address: str | None = None
    gpus_per_worker: float | None = None     # per Ray actor; None: one when the cluster has GPUs
    dtype: str = "auto"
    device: str = "auto"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.stages = tuple(int(s) for s in self.stages)
        self.init_depth = tuple(self.init_depth)
        for name in ("terminals", "operators"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(getattr(self, name)))
        self.seed_metrics, self.baselines = tuple(self.seed_metrics), tuple(self.baselines)
        self.search = tuple(self.search)
        self.fixed_settings = tuple(self.fixed_settings)
        self.validate()

    def reconstructs(self, stage: int) -> bool:
        """Whether candidates in `stage` (0-based; -1: the last) are measured with the recipe's
        update: every stage after the proxy stages, when there is an update."""
        stage = stage % len(self.stages)
        return self.update != "none" and stage >= self.proxy_stages

    def searches(self, part: str) -> bool:
        return part in self.search

    def sequential(self, stage: int) -> bool:
        """Whether candidates in `stage` are pruned as `apply` prunes them: the last stage, with
        fitness "sequential"."""
        return self.fitness == "sequential" and stage % len(self.stages) == len(self.stages) - 1

    def screens(self, stage: int) -> bool:
        """Whether `stage` scores shortened chunks (--screen-tokens: the first stage only)."""
        return self.screen_tokens is not None and stage % len(self.stages) == 0

    def stage_mode(self, stage: int) -> str:
        """How a stage prunes its candidates, for logs and the stage check: "mask" (the metric's
        masks alone, one-shot), "one-shot" (with the update, from the dense statistics) or
        "sequential"."""
        if self.sequential(stage):
            return "sequential"
        return "one-shot" if self.reconstructs(stage) else "mask"

    def validate(self):
        self.sparsity = resolve_sparsity(self.structure, self.sparsity)
        checks.model_and_text(self.bos, self.dtype, self.device, self.seqlen)
        checks.text_source("calibration", self.calibration)
        checks.text_source("search_data", self.search_data, optional=True)
        for name in ("nsamples", "heldout_chunks", "tournament", "hof_size", "max_height", "population",
                     "generations", "workers"):
            checks.integer(name, getattr(self, name))
        checks.integer("seed", self.seed, minimum=0)
        checks.integer("threads", self.threads, optional=True)
        checks.number("time_limit", self.time_limit, low=0, low_open=True, optional=True)
        checks.number("gpus_per_worker", self.gpus_per_worker, low=0, optional=True)
        checks.number("cxpb", self.cxpb, 0, 1)
        checks.number("mutpb", self.mutpb, 0, 1)
        if not self.stages or any(b <= a for a, b in zip(self.stages, self.stages[1:])) or self.stages[0] < 1:
            raise SearchConfigError(f"--stages must be increasing chunk counts >= 1, got {self.stages}")
        checks.number("promote", self.promote, 0, 1, low_open=True)
        checks.integer("screen_tokens", self.screen_tokens, optional=True, minimum=2)
        if self.screen_tokens is not None and self.screen_tokens >= self.seqlen:
            raise SearchConfigError(f"--screen-tokens {self.screen_tokens} must be shorter than the chunks "
                                    f"(--seqlen {self.seqlen}); leave it out to score whole chunks")
        if self.screen_tokens is not None and len(self.stages) < 2:
            raise SearchConfigError("--screen-tokens shortens the first of several stages: give --stages with "
                                    "two or more, the later ones scoring whole chunks")
        # spelled as the searched updates spell theirs (a default left out), so equal settings share a key
        self.update = Update.parse(self.update).spec()
        if self.fitness is None:
            self.fitness = "sequential" if self.update != "none" else "one-shot"
        checks.choice("fitness", self.fitness, ("one-shot", "sequential"))
        checks.integer("fitness_samples", self.fitness_samples, optional=True)
        if self.fitness_samples is not None and self.fitness_samples > self.nsamples:
            raise SearchConfigError(f"--fitness-samples {self.fitness_samples} is more than the {self.nsamples} "
                                    f"calibration windows (--nsamples)")
        checks.integer("stage_check", self.stage_check, minimum=0)
        unknown = [n for n in self.fixed_settings if n not in SETTINGS]
        if unknown:
            raise SearchConfigError(f"--fixed-settings: no update setting {', '.join(unknown)}; the searched ones "
                                    f"are {', '.join(SETTINGS)}")
        if self.fixed_settings and "update" not in self.search:
            raise SearchConfigError("--fixed-settings keeps some update settings while the others evolve: add "
                                    "update to --search (without it every setting stays as --update gives it)")
        if self.fast_track and ("update" not in self.search or self.update == "none"):
            raise SearchConfigError("--fast-track sends new update settings of proven masks to the last stage: "
                                    "it needs --search with update (and an --update to start from)")
        parts = ("metric", "update", "allocation")
        if not self.search or any(p not in parts for p in self.search) or len(set(self.search)) < len(self.search):
            raise SearchConfigError(f"--search must name some of {', '.join(parts)} once each, got "
                                    f"{','.join(self.search)}")
        if "update" in self.search and self.update == "none":
            raise SearchConfigError("--search update evolves the reconstruction's settings: give an --update "
                                    "(admm, admm-pcg, obs or obs-adaptive) to start from")
        if "allocation" in self.search and self.structure != "unstructured":
            raise SearchConfigError("--search allocation spreads unstructured sparsity over the layers: N:M keeps "
                                    "one pattern in every layer")
        if "metric" not in self.search and not self.seed_metrics:
            raise SearchConfigError("a search that freezes the metric (--search without metric) prunes with the "
                                    "first --seed-metrics: give one")
        if 0 < self.stage_check < 3:
            raise SearchConfigError(f"--stage-check {self.stage_check}: a rank correlation needs at least 3 "
                                    f"candidates (20 or more to mean much)")
        checks.integer("proxy_stages", self.proxy_stages, minimum=0)
        # the proxy stages only matter with an update, whose last stage must reconstruct
        if self.update != "none" and self.proxy_stages > len(self.stages) - 1:
            raise SearchConfigError(f"--proxy-stages {self.proxy_stages} leaves no stage scored with --update "
                                    f"{self.update} among --stages {','.join(map(str, self.stages))}: give more "
                                    f"stages, or a smaller --proxy-stages (at most {len(self.stages) - 1})")
        checks.choice("strategy", self.strategy, ("evolution", "random"))
        checks.integer("population", self.population, minimum=2)
        checks.integer("elite", self.elite, minimum=0, maximum=self.population - 1)
