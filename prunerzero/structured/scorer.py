"""Scoring DarwinLM candidates: build the smaller model of a genome from the level database,
train it lightly, measure its KL from the dense model. `score_genome` is the one definition;
a `Scorer` holds what it needs (model, database, windows) in a worker process or Ray actor,
loaded once from a picklable `ScoreSetup`, so `darwin --workers N` / `--ray` spread a
stage's candidates as `evolve` spreads metrics (runs/pools.py). A task carries its own
seed and windows, so any worker gives the driver's answer."""
from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..loading import load_model
from .database import Database
from .fitness import DenseReference, kl_divergence, light_train
from .shrink import materialize


@dataclass(frozen=True)
class ScoreTask:
    genome: tuple[int, ...]
    train: tuple[int, ...]         # indices of the training windows
    score: tuple[int, ...]         # indices of the scoring windows
    seed: int                      # torch seed of the light training


def score_genome(build, reference: DenseReference, train: torch.Tensor, lr: float, task: ScoreTask) -> float:
    """KL(dense || candidate) per token after light training; inf for a diverged candidate."""
    torch.manual_seed(task.seed)
    model = build(task.genome)
    light_train(model, train[list(task.train)], lr)
    kl = kl_divergence(model, reference, task.score)
    return kl if math.isfinite(kl) else math.inf


@dataclass
class ScoreSetup:
    model: str | None
    database: str | dict[str, bytes]   # the database folder, or its files (for nodes without this disk)
    reference: torch.Tensor            # scoring windows (the dense model's distribution is the target)
    train: torch.Tensor                # light-training windows
    lr: float
    dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None

    def inline(self) -> "ScoreSetup":
        """This setup with the database's files read in, for Ray nodes that cannot read this disk."""
        if isinstance(self.database, dict):
            return self
        files = {p.name: p.read_bytes() for p in Path(self.database).iterdir() if p.is_file()}
        return dataclasses.replace(self, database=files)


def _database(source) -> Database:
    """The database at a folder, or written from its files into a temporary folder first."""
    if isinstance(source, dict):
        folder = Path(tempfile.mkdtemp(prefix="prunerzero-db-"))
        for name, data in source.items():
            (folder / name).write_bytes(data)
        source = folder
    return Database(source)


class Scorer:
    """One worker's model, database and windows; `evaluate(task)` -> the task's KL."""

    def __init__(self, setup: ScoreSetup, model=None):
        if setup.threads:
            torch.set_num_threads(setup.threads)
        # the whole model runs (training, KL): never onloaded block by block
        self.model = model if model is not None else load_model(setup.model, setup.dtype, setup.device,
                                                                tokenizer=False, onload="never")[0]
        self.db = _database(setup.database)
        self.reference = DenseReference(self.model, setup.reference)
        self.train, self.lr = setup.train, setup.lr

    def __call__(self, task: ScoreTask) -> float:
        return score_genome(lambda g: materialize(self.model, self.db, g), self.reference, self.train, self.lr, task)

    evaluate = __call__  # the name Ray actors are called by
