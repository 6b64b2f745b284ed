"""Settings of `prunerzero eval` and `prunerzero apply`, parsed and checked once (at the command
line or by the caller) and carried down whole; written next to every result in report.json."""
from __future__ import annotations

from pathlib import Path
from dataclasses import dataclass

from . import checks
from .engine.allocation import check_allocation
from .engine.masks import parse_structure, resolve_sparsity
from .engine.reconstruct import Update
from .settings import Settings, TaskSettings
from .language.space import recipe_defaults


@dataclass
class EvalConfig(Settings, TaskSettings):
    model: str | None = None          # HF id or folder; None: the bundled SmolLM2-135M
    seqlen: int = 512
    eval_data: str | None = None      # None: WikiText-2 test (held-out Wikipedia if missing)
    eval_chunks: int | None = None    # None: the whole split
    data_dir: str | None = None
    bos: str = "auto"                 # BOS per sequence: auto (as the tokenizer does), always, never
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self):
        self.validate()

    def validate(self):
        checks.model_and_text(self.bos, self.dtype, self.device, self.seqlen)
        checks.integer("eval_chunks", self.eval_chunks, optional=True)
        checks.text_source("eval_data", self.eval_data, optional=True)
        self.validate_tasks()


@dataclass
class ApplyConfig(EvalConfig):
    metric: str = "pruner-zero"       # metric text or catalog name (method "metric")
    method: str = "metric"            # or "sparsegpt": second-order reconstruction
    sparsity: float | None = None     # None: 0.5 unstructured, N/M for N:M
    structure: str = "unstructured"   # unstructured, 2:4, 4:8, ...
    group: str | None = None          # unstructured comparison group; None: the metric's own
    update: str | None = None         # reconstruction of the kept weights: none, obs, obs-adaptive, admm;
                                      # None: the catalogued recipe's (none for other metrics)
    allocation: str | None = None     # per-layer sparsity: uniform, owl or search (unstructured only); None: likewise
    allocation_generations: int = 20  # generations of --allocation search (resumed and extended from the cache)
    nsamples: int = 32
    calibration: str = "wikipedia"
    seed: int = 0
    sequential: bool = True           # score each block from the pruned model's activations
    eval_dense: bool = True           # also measure the dense model

    def validate(self):
        super().validate()
        self.sparsity = resolve_sparsity(self.structure, self.sparsity)
        checks.choice("method", self.method, ("metric", "sparsegpt"))
        checks.choice("group", self.group, (None, "row", "layer"))
        self.update, self.allocation = recipe_defaults(self.metric if self.method == "metric" else None,
                                                       self.update, self.allocation)
        self.update = Update.parse(self.update).spec()
        if str(self.allocation).endswith(".json"):   # a per-layer sparsity a search saved
            check_allocation("search", self.structure)
            if not Path(self.allocation).is_file():
                raise checks.SettingsError(f"--allocation {self.allocation}: no such file")
        else:
            check_allocation(self.allocation, self.structure)
        if self.method == "sparsegpt" and self.allocation != "uniform":
            raise checks.SettingsError("--allocation applies to --method metric")
        if self.method == "sparsegpt" and self.update != "none":
            raise checks.SettingsError("--update reconstructs after a metric's mask; --method sparsegpt has its own")
        checks.integer("allocation_generations", self.allocation_generations)
        checks.integer("nsamples", self.nsamples)
        checks.integer("seed", self.seed, minimum=0)
        checks.text_source("calibration", self.calibration)

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_structure(self.structure, self.sparsity)
