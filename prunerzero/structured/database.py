"""The level database of DarwinLM: for every decoder block and every sparsity level of its
attention (query heads) and MLP (channels), which units are kept and the compensated
output projection (o_proj / down_proj columns), found by greedy structured OBS (ZipLM).

Removing a set S of input columns of W with curvature H = sum x x^T costs
tr(W_S [H^-1]_SS^-1 W_S^T) of output error; the other columns absorb it through
dW = -W_S [H^-1]_SS^-1 [H^-1]_S:, and H^-1 loses S by the same Schur step. One greedy pass
per block visits every level, so the levels are nested. Only kept columns are stored, one
safetensors file per block, so an interrupted build resumes at the block it stopped in.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from ..progress import bar, logger

from ..engine.blocks import block_inputs
from ..engine.passes import run_block
from ..engine.calibration import Hessians, content_digest
from ..engine.models import decoder_layers
from .units import Anatomy, StructureError, anatomy, attention_of, mlp_of

DEFAULT_LADDER = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class Level:
    kept: tuple[int, ...]      # kept query heads (attention) or channels (MLP), ascending
    params: int                # parameters of the module at this level
    error: float               # ||(W - W_level) X||^2 / ||W X||^2 on the calibration tokens


def kept_counts(total: int, ladder, multiple: int = 1) -> list[int]:
    """Distinct unit counts, most first, for removed fractions `ladder` (0 = dense, 1 = none)."""
    counts = {max(0, min(total, multiple * round(total * (1 - f) / multiple))) for f in ladder}
    return sorted(counts | {total}, reverse=True)


def greedy_obs(W: torch.Tensor, H: torch.Tensor, groups: list[list[int]], stops: list[int],
               percdamp: float = 0.01, step: int = 1):
    """Remove column groups of W one (or `step`) at a time by least OBS cost, updating the rest.

    Returns {kept group count: (kept group ids, W restricted to their columns, relative error)}
    for every count in `stops`."""
    H = H.double()
    W = W.double().clone()
    dead = H.diagonal() == 0
    Hd = H.clone()
    Hd.diagonal().add_(percdamp * H.diagonal().mean().clamp_min(1e-12))
    Hd.diagonal()[dead] = 1.0
    Hinv = torch.linalg.inv(Hd)
    W0, base = W.clone(), abs(float(((W @ H) * W).sum())) or 1.0
    alive = list(range(len(groups)))
    out, stops = {}, sorted(set(stops), reverse=True)

    def snapshot():
        cols = [c for g in alive for c in groups[g]]
        dW = W - W0
        err = float(((dW @ H) * dW).sum()) / base
        out[len(alive)] = (tuple(alive), W[:, cols].float().contiguous(), err)

    single = all(len(g) == 1 for g in groups)
    col_group = {g[0]: i for i, g in enumerate(groups)} if single else {}
    removed = torch.zeros(W.shape[1], dtype=torch.bool, device=W.device)
    while True:
        if len(alive) in stops:
            snapshot()
        if not alive or len(alive) <= stops[-1]:
            return out
        next_stop = max(s for s in stops if s < len(alive))
        n = min(step, len(alive) - next_stop)
        if single:
            sal = W.square().sum(0) / Hinv.diagonal()
            sal[removed] = torch.inf
            pick = [col_group[c] for c in torch.argsort(sal, stable=True)[:n].tolist()]
        else:
            sal = []
            for g in alive:
                S = groups[g]
                sal.append(float((W[:, S] @ torch.linalg.inv(Hinv[S][:, S]) * W[:, S]).sum()))
            order = sorted(range(len(alive)), key=lambda i: sal[i])
            pick = [alive[i] for i in order[:n]]
        S = [c for g in pick for c in groups[g]]
        inv_SS = torch.linalg.inv(Hinv[S][:, S])
        W -= W[:, S] @ inv_SS @ Hinv[S, :]
        Hinv -= Hinv[:, S] @ inv_SS @ Hinv[S, :]
        W[:, S] = 0
        removed[S] = True
        Hinv[S, :] = 0
        Hinv[:, S] = 0
        Hinv[S, S] = 1.0  # keeps removed columns inert in later Schur steps
        picked = set(pick)
        alive = [g for g in alive if g not in picked]


class DatabaseDamaged(Exception):
    """A database file that cannot be trusted; the builder discards it and builds it again."""


def layer_file(path: Path, i: int) -> Path:
    return Path(path) / f"layer_{i:03d}.safetensors"


def check_layer_file(file: Path, i: int, settings: dict) -> dict:
    """The levels of a block file whose layer, settings and content checksum match what was
    written and whose weights are finite; DatabaseDamaged otherwise (truncated, edited, NaN,
    another block's file, another database's)."""
    try:
        with safe_open(str(file), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        text = meta["levels"]
        levels = json.loads(text)
    except Exception as e:  # noqa: BLE001 - safetensors and json raise their own types for damage
        raise DatabaseDamaged(f"{file.name} is unreadable ({type(e).__name__})") from None
    if meta.get("layer") != str(i) or meta.get("settings") != _settings_text(settings):
        raise DatabaseDamaged(f"{file.name} was written for another block or other settings")
    if meta.get("sha256") != _digest(tensors, text):
        raise DatabaseDamaged(f"{file.name} does not match its checksum")
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise DatabaseDamaged(f"{file.name} holds NaN or infinite weights")
    return levels


def _settings_text(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def _digest(tensors: dict, levels_text: str) -> str:
    """One checksum over a block's weights and its level table (kept units, parameters, errors)."""
    return hashlib.sha256((content_digest(tensors) + levels_text).encode()).hexdigest()


class Database:
    """Reads a built database folder: `levels[kind][layer]` lists Level entries, densest first;
    `weights(kind, layer, index)` loads the compensated output-projection columns. Every block
    file is checked against its checksum when the database is opened (DatabaseDamaged)."""

    def __init__(self, path, verify: bool = True):
        self.path = Path(path)
        try:
            meta = json.loads((self.path / "meta.json").read_text())
            self._read(meta)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise DatabaseDamaged(f"meta.json is unreadable ({type(e).__name__})") from None
        self._meta = meta
        if verify:
            self.verify()

    def verify(self) -> "Database":
        """Every block file against its checksum, meta.json against the block files, and every kept
        unit within the model's; DatabaseDamaged otherwise."""
        for i in range(self.n_layers):
            levels = check_layer_file(layer_file(self.path, i), i, self.settings)
            if any(levels[k] != self._meta[k][i] for k in ("attn", "mlp")):
                raise DatabaseDamaged(f"meta.json does not match {layer_file(self.path, i).name}")
        for kind, units in (("attn", self.anatomy.heads), ("mlp", self.anatomy.channels)):
            if any(not 0 <= u < units for layer in self.levels[kind] for lv in layer for u in lv.kept):
                raise DatabaseDamaged(f"meta.json names {kind} units the model does not have")
        return self

    def _read(self, meta: dict):
        self.settings = meta["settings"]
        # seconds the blocks took to build; None for a database built before this was kept
        self.build_s = meta.get("build_s")
        self.ladder = tuple(meta["ladder"])
        self.anatomy = Anatomy(**meta["anatomy"])
        self.levels = {kind: [[Level(tuple(e["kept"]), e["params"], e["error"]) for e in layer]
                              for layer in meta[kind]] for kind in ("attn", "mlp")}

    @property
    def n_layers(self) -> int:
        return len(self.levels["attn"])

    def weights(self, kind: str, layer: int, index: int) -> torch.Tensor | None:
        """Output-projection columns at a level; None for the dense level (use the model's)."""
        if index == 0:
            return None
        with safe_open(str(layer_file(self.path, layer)), "pt") as f:
            key = f"{kind}.{index}"
            return f.get_tensor(key) if key in f.keys() else None


def database_settings(model_name, calibration, nsamples, seqlen, seed, ladder, multiple, percdamp, dtype) -> dict:
    return dict(model=model_name, calibration=calibration, nsamples=nsamples, seqlen=seqlen, seed=seed,
                ladder=list(ladder), multiple=multiple, percdamp=percdamp, dtype=str(dtype), version=2)


@torch.no_grad()
def build_database(model, samples: torch.Tensor, path, settings: dict, ladder=DEFAULT_LADDER,
                   multiple: int = 8, percdamp: float = 0.01, mlp_step: int | None = None,
                   progress: bool = True) -> Database:
    """Build (or finish building) the database of `model` in folder `path` from calibration
    `samples` passed through the dense blocks; a finished folder is reused as it is."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StructureError(f"the level database {path} is a file; give a folder (or leave --database out)")
    if (path / "meta.json").is_file():
        try:
            db = Database(path, verify=False)
        except DatabaseDamaged as e:
            db = None
            logger.warning(f"level database {path}: {e}; building it again")
            (path / "meta.json").unlink()
        if db is not None:
            if db.settings != settings:
                raise StructureError(f"{path} holds a database built with other settings; use another folder")
            try:
                return db.verify()
            except DatabaseDamaged as e:
                logger.warning(f"level database {path}: {e}; building the damaged blocks again")
                (path / "meta.json").unlink()
    path.mkdir(parents=True, exist_ok=True)
    an = anatomy(model)
    head_counts = kept_counts(an.heads, ladder)
    chan_counts = kept_counts(an.channels, ladder, multiple)
    step = mlp_step or max(1, an.channels // 256)  # a few channels per OBS step: same levels, fewer steps
    inputs, calls = block_inputs(model, samples)
    meta = {"settings": settings, "ladder": list(ladder), "anatomy": an.__dict__, "attn": [], "mlp": [], "build_s": 0.0}
    for i, block in enumerate(bar(decoder_layers(model), desc="level database", enabled=progress)):
        file = layer_file(path, i)
        entry = _reusable(file, i, settings)
        if entry is not None:  # built before an interruption
            inputs = run_block(block, inputs, calls[i])
        else:
            t0 = time.perf_counter()
            attn, mlp = attention_of(block), mlp_of(block)
            with Hessians({"o": attn.o_proj, "down": mlp.down_proj}) as rec:
                inputs = run_block(block, inputs, calls[i])  # the dense outputs feed the next block
            _build_block(attn, mlp, rec, an, head_counts, chan_counts, percdamp, step, file, t0, i, settings)
            left = sum(not layer_file(path, j).is_file() for j in range(i + 1, len(calls)))
            if left and not meta["build_s"]:  # the first block built: say what the rest will cost
                took = time.perf_counter() - t0
                logger.warning(f"level database: block {i} took {took:.0f} s; the {left} blocks left need about "
                               f"{took * left / 60:.0f} min (once: the database is cached, and an interrupted build "
                               "resumes; a ladder that removes less, e.g. --ladder 0,0.2,0.4,0.6, is cheaper)")
            entry = check_layer_file(file, i, settings)
        meta["attn"].append(entry["attn"])
        meta["mlp"].append(entry["mlp"])
        meta["build_s"] += entry.get("seconds", 0.0)
    (path / "meta.json.partial").write_text(json.dumps(meta))
    (path / "meta.json.partial").rename(path / "meta.json")
    return Database(path, verify=False)  # every block was checked as it was built or reused above


def _reusable(file: Path, i: int, settings: dict) -> dict | None:
    """The levels of a block file an interrupted build left, if it can be trusted (else it goes)."""
    if not file.is_file():
        return None
    try:
        return check_layer_file(file, i, settings)
    except DatabaseDamaged as e:
        logger.warning(f"level database: {e}; building block {i} again")
        file.unlink()
        return None


def _build_block(attn, mlp, rec: Hessians, an: Anatomy, head_counts, chan_counts, percdamp, step, file, t0, i,
                 settings):
    d = an.head_dim
    heads = greedy_obs(attn.o_proj.weight, rec.H["o"], [list(range(h * d, (h + 1) * d)) for h in range(an.heads)],
                       head_counts, percdamp)
    chans = greedy_obs(mlp.down_proj.weight, rec.H["down"], [[c] for c in range(an.channels)],
                       chan_counts, percdamp, step)
    tensors, levels = {}, {"attn": [], "mlp": []}
    for kind, found, counts, params in (("attn", heads, head_counts, an.attn_params),
                                        ("mlp", chans, chan_counts, lambda k: an.mlp_params(len(k)))):
        for index, count in enumerate(counts):
            kept, W, err = found[count]
            levels[kind].append({"kept": list(kept), "params": params(kept), "error": err})
            if 0 < index and count > 0:  # columns are in ascending unit order already
                tensors[f"{kind}.{index}"] = W.to(attn.o_proj.weight.dtype).contiguous()
    tmp = file.with_suffix(".partial")
    levels["seconds"] = time.perf_counter() - t0  # kept with the block, so a resumed build still adds up
    for kind in ("attn", "mlp"):
        if not all(bool(torch.isfinite(t).all()) for k, t in tensors.items() if k.startswith(kind)):
            raise StructureError(f"block {i}: the {kind} levels came out NaN or infinite (the model's weights "
                                 "or activations are not finite); check the model, or load it in fp32")
    text = json.dumps(levels)
    save_file(tensors, str(tmp), metadata={"levels": text, "layer": str(i), "settings": _settings_text(settings),
                                           "sha256": _digest(tensors, text)})
    tmp.rename(file)
