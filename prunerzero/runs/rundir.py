"""The run folder of a search (evolve, darwin, an allocation search): config.json, log.jsonl
(one line per generation), evaluations.jsonl, failures.jsonl, checkpoint.json (after every
generation, written atomically; data only, see checkpoint.py), hall_of_fame.json and fitness.png.

A run folder may come from someone else, so resuming one treats it as data:
- config.json carries a checksum of the settings; an edited or damaged one is refused before
  anything loads (the checkpoint has its own);
- nothing in it is ever executed (no pickles; the commands never take task code from it);
- a path it names that the run would write to must lie inside the folder or the cache
  (`contained`);
- one process at a time writes it (a lock file, see locks.py)."""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from .. import checks
from ..progress import say
from .checkpoint import FILE, LEGACY, CheckpointError, decode, encode
from .locks import FolderLock, lock_beside
from .output import resolve_target

LOGS = ("log.jsonl", "evaluations.jsonl", "failures.jsonl")  # rows carry the generation "gen"
SUM = "settings_sha256"


def settings_digest(config: dict) -> str:
    body = {k: v for k, v in config.items() if k != SUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=_plain).encode()).hexdigest()


def contained(path, roots) -> bool:
    """Whether `path`, symlinks resolved, lies inside one of `roots` (also resolved)."""
    try:
        real = Path(path).resolve()
    except (RuntimeError, OSError):
        return False
    for root in roots:
        try:
            real.relative_to(Path(root).resolve())
            return True
        except (ValueError, RuntimeError, OSError):
            continue
    return False


class RunDir:
    def __init__(self, path, kind: str | None = None, option: str = "output"):
        """kind: "evolve" or "darwin", written into config.json and the checkpoint and checked
        on resume; None only for reading logs."""
        if path is None or not str(path).strip():
            raise checks.SettingsError("give --output RUN for a new run (a folder), or --resume RUN")
        self.shown, self.kind = str(path), kind
        self.path = resolve_target(option, path)
        self.lock: FolderLock | None = None

    @classmethod
    def open_resumed(cls, path, kind: str, settings_of):
        """(run, checkpoint state, settings) of a run to resume, the folder locked for this process
        and its checkpoint validated before any model or data is loaded; settings_of(run) reads
        and checks the settings. Nothing stays locked when a check fails."""
        run = cls(path, kind, "resume").hold()
        try:
            state = run.load_checkpoint()
            return run, state, settings_of(run)
        except BaseException:
            run.release()
            raise

    def hold(self) -> "RunDir":
        """Lock the folder for this process (until release() or exit); BusyError if another holds
        it (see locks.lock_beside)."""
        if self.lock is None:
            self.lock = lock_beside(self.path, f"run folder {self.shown}")
        return self

    def release(self):
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def ensure_new(self):
        """A folder a new run can be written to (absent or empty, creatable, writable), locked for
        this process; checked before any work."""
        if self.path.is_dir() and any(self.path.iterdir()):
            raise FileExistsError(f"run folder {self.shown} exists and is not empty; "
                                  f"continue it with --resume {self.shown}")
        checks.output_folder("output", self.path, optional=False)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.hold()

    def create(self, config: dict):
        self.ensure_new()
        self.path.mkdir(parents=True, exist_ok=True)
        config = dict(config, run_kind=self.kind) if self.kind else dict(config)
        self.write_json("config.json", dict(config, **{SUM: settings_digest(config)}))

    def config(self) -> dict:
        """The run's settings, checked to belong to a run of this folder's kind and to be as the
        run wrote them (their checksum): a resume never uses settings edited after the fact."""
        kind = self.kind
        f = self.path / "config.json"
        if not f.is_file():
            raise FileNotFoundError(f"{self.shown} is not a run folder (no config.json)")
        try:
            config = json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{self.shown}/config.json is damaged (not valid JSON); start a new run") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.shown}/config.json holds no settings; start a new run")
        other = config.get("run_kind", kind)
        if other != kind:
            raise CheckpointError(f"{self.shown} is a `prunerzero {other}` run, not a `prunerzero {kind}` run; "
                                  f"resume it with prunerzero {other} --resume {self.shown}")
        if SUM not in config:
            raise CheckpointError(f"{self.shown}/config.json has no settings checksum (written by an older "
                                  "prunerzero, or by hand); start a new run")
        if config[SUM] != settings_digest(config):
            raise CheckpointError(f"{self.shown}/config.json fails its checksum: its settings were edited or "
                                  "damaged after the run wrote them; start a new run (its settings cannot change "
                                  "on --resume)")
        return config

    def write_json(self, name, data):
        self._atomic(name, json.dumps(data, indent=2, default=_plain).encode())

    def append(self, name, record: dict):
        with open(self.path / name, "a") as f:
            f.write(json.dumps(record, default=_plain) + "\n")

    def read_lines(self, name) -> list[dict]:
        f = self.path / name
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []

    def truncate_log(self, name, keep_generations: int, keep_tagged: bool = True):
        """Drop log rows of generations after the checkpoint (a run killed mid-write). Rows
        tagged with a name instead of a generation (the baselines, measured before the first
        checkpoint) stay when `keep_tagged`."""
        if not (self.path / name).is_file():
            return

        def kept(r):
            g = r.get("gen", -1)
            return g < keep_generations if isinstance(g, int) else keep_tagged
        lines = [r for r in self.read_lines(name) if kept(r)]
        self._atomic(name, "".join(json.dumps(r) + "\n" for r in lines).encode())

    def save_checkpoint(self, state: dict):
        self._atomic(FILE, encode(self.kind, state))

    def load_checkpoint(self) -> dict | None:
        """The validated state of the run's checkpoint; None if the run stopped before its
        first one. Cheap: call it before loading a model, so a bad folder fails at once."""
        f = self.path / FILE
        if not f.is_file():
            if (self.path / LEGACY).is_file():
                raise CheckpointError(f"{self.path} holds {LEGACY}, a pickle written by an older prunerzero; "
                                      "pickles can run code, so it is never loaded: start a new run")
            return None
        return decode(f.read_bytes(), self.kind, self.path)

    def resume(self, search, state: dict | None) -> bool:
        """Restore `search` from a checkpoint state (None: start afresh), dropping the log rows
        of the generation in progress when the run was killed."""
        keep = state["gen"] if state else 0
        for name in LOGS:
            self.truncate_log(name, keep, keep_tagged=state is not None)
        if not state:
            return False
        search.restore(state)
        say(f"resuming {self.path} at generation {search.gen}")
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
