"""Settings of a DarwinLM structured search, every default written to RUN/config.json.
Defaults are sized for the bundled SmolLM2-135M on a 2-core CPU (about 2-3 minutes per
generation); on a GPU raise `offspring`, `generations` and the stage token counts."""
from __future__ import annotations

from dataclasses import dataclass

from ..data import BOS_CHOICES
from ..errors import PrunerZeroError
from ..settings import Settings
from .database import DEFAULT_LADDER


class DarwinConfigError(PrunerZeroError, ValueError):
    pass


def parse_stages(text: str) -> tuple[tuple[int, int, int], ...]:
    """'512:1024:4,1024:2048:2' -> ((train tokens, eval tokens, survivors), ...)."""
    try:
        return tuple(tuple(int(x) for x in part.split(":")) for part in text.split(","))
    except ValueError:
        raise DarwinConfigError(f"stages must look like 512:1024:4,1024:2048:2 (train tokens:eval tokens:"
                                f"survivors), got {text!r}") from None


@dataclass
class DarwinConfig(Settings):
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
    dtype: str = "fp32"
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self):
        if isinstance(self.stages, str):
            self.stages = parse_stages(self.stages)
        self.stages = tuple(tuple(int(x) for x in s) for s in self.stages)
        self.ladder = tuple(float(f) for f in self.ladder)
        self.validate()

    def validate(self):
        if self.bos not in BOS_CHOICES:
            raise DarwinConfigError(f"bos must be one of {', '.join(BOS_CHOICES)}, got {self.bos!r}")
        if not self.stages or any(len(s) != 3 or s[0] < 0 or s[1] < 1 or s[2] < 1 for s in self.stages):
            raise DarwinConfigError(f"each stage needs train tokens >= 0, eval tokens >= 1 and survivors >= 1, "
                                    f"got {self.stages}")
        if any(b[2] > a[2] for a, b in zip(self.stages, self.stages[1:])) or self.stages[0][2] > self.offspring + 1:
            raise DarwinConfigError("survivors must not grow from stage to stage nor exceed offspring + 1")
        if not self.ladder or any(not 0 <= f <= 1 for f in self.ladder):
            raise DarwinConfigError(f"ladder fractions must lie in [0, 1], got {self.ladder}")
        if self.target <= 0:
            raise DarwinConfigError(f"target must be a positive fraction or count, got {self.target}")
        if self.generations < 0 or self.offspring < 1 or self.multiple < 1 or self.max_switches < 1:
            raise DarwinConfigError("generations >= 0, offspring >= 1, multiple >= 1, max_switches >= 1 are needed")
        windows = max(-(-s[1] // self.seqlen) for s in self.stages)
        if windows > self.fitness_windows // 2:
            raise DarwinConfigError(f"the last stage scores {windows} windows of {self.seqlen} tokens but only "
                                    f"{self.fitness_windows // 2} are set aside for scoring; raise fitness_windows")
