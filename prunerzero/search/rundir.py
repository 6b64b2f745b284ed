"""The run directory of a search: config.json, log.jsonl (one line per generation),
evaluations.jsonl, failures.jsonl, checkpoint.pkl (after every generation, written
atomically), hall_of_fame.json and fitness.png."""
from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path


class RunDir:
    def __init__(self, path):
        self.path = Path(path)

    def ensure_new(self):
        if self.path.exists() and any(self.path.iterdir()):
            raise FileExistsError(f"run folder {self.path} exists and is not empty; "
                                  f"continue it with --resume {self.path}")

    def create(self, config: dict):
        self.ensure_new()
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_json("config.json", config)

    def config(self) -> dict:
        f = self.path / "config.json"
        if not f.is_file():
            raise FileNotFoundError(f"{self.path} is not a search run (no config.json)")
        return json.loads(f.read_text())

    def write_json(self, name, data):
        self._atomic(name, json.dumps(data, indent=2, default=_plain).encode())

    def append(self, name, record: dict):
        with open(self.path / name, "a") as f:
            f.write(json.dumps(record, default=_plain) + "\n")

    def read_lines(self, name) -> list[dict]:
        f = self.path / name
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []

    def truncate_log(self, name, keep_generations: int):
        """Drop log lines of generations after the checkpoint (a run killed mid-write)."""
        lines = [r for r in self.read_lines(name) if r.get("gen", -1) < keep_generations]
        self._atomic(name, "".join(json.dumps(r) + "\n" for r in lines).encode())

    def save_checkpoint(self, state: dict):
        self._atomic("checkpoint.pkl", pickle.dumps(state))

    def load_checkpoint(self) -> dict | None:
        f = self.path / "checkpoint.pkl"
        return pickle.loads(f.read_bytes()) if f.is_file() else None

    def resume(self, search, log) -> bool:
        """Restore `search` from the checkpoint, if there is one, dropping log lines of the
        generation in progress when the run was killed."""
        state = self.load_checkpoint()
        if not state:
            return False
        search.restore(state)
        self.truncate_log("log.jsonl", search.gen)
        log(f"resuming {self.path} at generation {search.gen}")
        return True

    def _atomic(self, name, data: bytes):
        tmp = self.path / (name + ".partial")
        tmp.write_bytes(data)
        os.replace(tmp, self.path / name)

    def plot(self, log: list[dict], reference: dict):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        if not log:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        gens = [r["gen"] for r in log]
        ax.plot(gens, [r["best"] for r in log], marker="o", label="best (all search chunks)")
        ax.plot(gens, [r["median_first_stage"] for r in log], marker=".", alpha=0.6,
                label="median offspring (first stage)")
        for i, (name, ppl) in enumerate(sorted(reference.items())):
            ax.axhline(ppl, ls="--", color=f"C{i + 2}", label=f"{name} (all search chunks)")
        ax.set(xlabel="generation", ylabel="search perplexity", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = self.path / "fitness.partial.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, self.path / "fitness.png")


def _plain(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (set, frozenset, tuple)):
        return list(x)
    return str(x)
