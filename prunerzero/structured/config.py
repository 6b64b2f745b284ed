"""Settings of a DarwinLM structured search, every default written to RUN/config.json.
Defaults are sized for the bundled SmolLM2-135M on a 2-core CPU (about 2-3 minutes per
generation); on a GPU raise `offspring`, `generations` and the stage token counts."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import checks
from ..settings import Settings, TaskSettings
from .database import DEFAULT_LADDER


class DarwinConfigError(checks.SettingsError):
    pass


def parse_stages(text: str) -> tuple[tuple[int, int, int], ...]:
    """'512:1024:4,1024:2048:2' -> ((train tokens, eval tokens, survivors), ...)."""
    try:
        return tuple(tuple(int(x) for x in part.split(":")) for part in text.split(","))
    except ValueError:
        raise DarwinConfigError(f"stages must look like 512:1024:4,1024:2048:2 (train tokens:eval tokens:"
                                f"survivors), got {text!r}") from None


# `darwin --quick`: minutes instead of hours on the bundled model on a CPU, for a first look
# (a smaller calibration for the database, a short search, fewer evaluation chunks); each
# value applies unless its own option is given.
QUICK = dict(nsamples=8, generations=3, offspring=4, stages=((256, 512, 2), (512, 1024, 1)), fitness_windows=8,
             eval_chunks=16)


@dataclass
class DarwinConfig(Settings, TaskSettings):
    model: str | None = None                  # HF id or folder; None: the bundled SmolLM2-135M
    target: float = 0.6                       # prunable parameters kept: a fraction in (0, 1] or a count
    # the level database
    ladder: tuple[float, ...] = DEFAULT_LADDER  # removed fractions of each module's units
    multiple: int = 8                         # MLP channel counts are multiples of this
    percdamp: float = 0.01
    nsamples: int = 32                        # calibration windows for the database Hessians
    seqlen: int = 512
    calibration: str = "wikipedia"
    database: str | None = None               # folder; None: the cache, keyed by every setting above
    # the evolutionary search
    generations: int = 10
    offspring: int = 8
    max_switches: int = 3                     # level switches per mutation (each one compensated)
    reach: int = 2                            # levels a switch may move a module
    stages: tuple[tuple[int, int, int], ...] = ((512, 1024, 4), (1024, 2048, 2), (2048, 4096, 1))
    fitness_windows: int = 64                 # calibration windows for fitness: half scored, half trained on
    lr: float = 1e-5                          # light fine-tuning inside selection (AdamW, batch 1)
    seed: int = 0
    time_limit: float | None = None           # seconds; stop after the generation that passes it
    # the final model
    eval_data: str | None = None              # None: WikiText-2 test (held-out Wikipedia if missing)
    eval_chunks: int = 64                     # perplexity on the first chunks of seqlen tokens
    eval_full: bool = False                   # also on the whole split (one pass gives both)
    data_dir: str | None = None
    bos: str = "auto"                         # BOS per sequence: auto (as the tokenizer does), always, never
    finetune_tokens: int = 0                  # post-training of the final models on calibration text
    finetune_lr: float = 1e-5
    baselines: bool = True                    # uniform and per-layer-error allocations, same parameters
    speed: bool = True                        # latency of the saved model against the dense one
    dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None
    # where candidates are scored (as evolve's): local processes or Ray actors, one model each
    workers: int = 1
    ray: bool = False
    ray_address: str | None = None
    gpus_per_worker: float | None = None      # None: one per actor when the Ray cluster has GPUs

    def __post_init__(self):
        if isinstance(self.stages, str):
            self.stages = parse_stages(self.stages)
        self.stages = tuple(tuple(int(x) for x in s) for s in self.stages)
        self.ladder = tuple(float(f) for f in self.ladder)
        self.validate()

    def validate(self):
        checks.model_and_text(self.bos, self.dtype, self.device, self.seqlen)
        self.validate_tasks()
        checks.text_source("calibration", self.calibration)
        checks.text_source("eval_data", self.eval_data, optional=True)
        if self.database is not None and Path(self.database).exists() and not Path(self.database).is_dir():
            raise DarwinConfigError(f"--database {self.database} is a file; give a folder (or leave --database out "
                                    "for the cache)")
        self.target = checks.number("target_params", self.target, low=0, low_open=True)
        if self.target > 1 and self.target != int(self.target):
            raise DarwinConfigError(f"--target-params must be a fraction in (0, 1] or a whole count of parameters, "
                                    f"got {self.target:g}")
        checks.integer("generations", self.generations, minimum=0)
        for name in ("offspring", "multiple", "max_switches"):
            checks.integer(name, getattr(self, name))
        for name in ("nsamples", "eval_chunks", "fitness_windows", "reach"):
            checks.integer(name, getattr(self, name))
        checks.integer("seed", self.seed, minimum=0)
        checks.integer("finetune_tokens", self.finetune_tokens, minimum=0)
        checks.integer("threads", self.threads, optional=True)
        checks.integer("workers", self.workers)
        checks.number("gpus_per_worker", self.gpus_per_worker, low=0, optional=True)
        checks.number("time_limit", self.time_limit, low=0, low_open=True, optional=True)
        checks.number("lr", self.lr, low=0)
        checks.number("finetune_lr", self.finetune_lr, low=0)
        checks.number("percdamp", self.percdamp, low=0, low_open=True)
        if not self.stages or any(len(s) != 3 or s[0] < 0 or s[1] < 1 or s[2] < 1 for s in self.stages):
            raise DarwinConfigError(f"--stages: each stage needs train tokens >= 0, eval tokens >= 1 and survivors >= 1, "
                                    f"got {self.stages}")
        if any(b[2] > a[2] for a, b in zip(self.stages, self.stages[1:])) or self.stages[0][2] > self.offspring + 1:
            raise DarwinConfigError("--stages: survivors must not grow from stage to stage nor exceed offspring + 1")
        if not self.ladder or any(not 0 <= f <= 1 for f in self.ladder):
            raise DarwinConfigError(f"--ladder fractions must lie in [0, 1], got {self.ladder}")
        windows = max(-(-s[1] // self.seqlen) for s in self.stages)
        if windows > self.fitness_windows // 2:
            most = self.fitness_windows // 2 * self.seqlen
            raise DarwinConfigError(f"--stages: the last stage scores {windows} windows of {self.seqlen} tokens but "
                                    f"only {self.fitness_windows // 2} are set aside for scoring; give it at most "
                                    f"{most} scoring tokens")
