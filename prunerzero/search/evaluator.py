"""Fitness of one candidate metric: one-shot masks from the cached dense primitives (and,
for a recipe, the kept weights reconstructed from the dense layer-input Hessians), their
fingerprint, and the NLL of the pruned model on a range of evaluation chunks.

An Evaluator holds one model copy; search workers (local processes, Ray actors) each hold
one. Everything it needs travels in a picklable `Setup`, and its answers depend only on the
task, so any worker gives the same result."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..engine.calibration import shared_inputs
from ..engine.blocks import execution_device, onloading
from ..engine.evaluate import nll_blockwise, nll_sum
from ..language.metric import Metric
from ..engine.layers import matrix, set_matrix
from ..engine.models import all_prunable, copy_fits, prunable_linears
from ..loading import load_model
from ..language.compile import layer_primitives, scorer
from ..engine.prune import apply_metric, metric_mask
from ..engine.allocation import LayerSparsity, layer_counts
from ..engine.reconstruct import Update, factorise, reconstruct


DENSE = "dense"  # task text that evaluates the unpruned model


@dataclass
class Setup:
    """What every evaluator needs: the model, the primitive files, the pruning target and
    the chunk sets (name -> (k, seqlen) token ids)."""
    model: str | None
    primitives: dict[str, str | dict]   # terminal -> safetensors file of per-layer tensors (or the tensors)
    nsamples: int                       # the N terminal
    sparsity: float
    structure: str
    chunks: dict[str, torch.Tensor]
    dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None          # torch threads per evaluator (None: torch's default)
    batch_size: int = 4
    update: dict = field(default_factory=dict)   # Update fields of the recipe's reconstruction
    hessians: str | dict | None = None  # safetensors of the dense X^T X per shared input (see
                                        # calibration.compute_hessians; or the tensors), needed by an update
    per_block: bool | None = None       # candidates pruned in place one decoder block at a
                                        # time (see Evaluator); None: when a whole-model copy of the
                                        # masked weights would not fit in free memory
    calibration: torch.Tensor | None = None   # (n, seqlen) token ids for sequential tasks (pruned as apply prunes)


    def inline(self) -> "Setup":
        """This setup with its files read into tensors, for workers that cannot read this disk."""
        return dataclasses.replace(self, primitives={t: _tensors(p) for t, p in self.primitives.items()},
                                   hessians=_tensors(self.hessians) if self.hessians else None)


def _tensors(source, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Per-layer tensors from a safetensors file, or as given."""
    if isinstance(source, dict):
        return {k: v.to(device) for k, v in source.items()}
    return load_file(source, device=str(device))


class LazyLayers(Mapping):
    """Per-layer tensors of a safetensors file read one layer at a time when asked for (and
    dropped by the caller after): a 7B model's G (13 GB in bf16) is never held whole."""

    def __init__(self, path: str, device):
        self.file, self.device = safe_open(path, framework="pt"), device
        self.names = list(self.file.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.file.get_tensor(name).to(self.device)

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


@dataclass
class Task:
    """Evaluate `text` (an OOS-simplified metric) on chunks [lo, hi) of set `chunks`; `known`
    maps mask fingerprints already measured to how many chunks of that set they cover."""
    text: str
    lo: int
    hi: int
    chunks: str = "search"
    known: dict = field(default_factory=dict)
    reconstruct: bool = False          # prune with the recipe's update (else the mask alone)
    update: str | None = None          # the candidate's own update spec (a searched recipe); None: the setup's
    allocation: dict | None = None     # the candidate's own sparsity per layer (exact total); None: uniform
    sequential: bool = False           # prune as `apply` does: block by block, each block's statistics
                                       # recomputed through the pruned earlier ones (with the update, if any)


@dataclass
class Result:
    text: str
    fingerprint: str | None = None
    lo: int = 0
    hi: int = 0
    nll: float = 0.0
    tokens: int = 0
    error: str | None = None
    cached: bool = False               # masks already measured: nothing evaluated
    seconds: float = 0.0
    prune_s: float = 0.0               # of `seconds`, those spent scoring, masking and reconstructing

    @property
    def perplexity(self) -> float:
        """exp(mean NLL) of the chunks this task evaluated; inf when it failed or evaluated none."""
        return math.exp(self.nll / self.tokens) if not self.error and self.tokens else math.inf


def fingerprint(masks: dict[str, torch.Tensor]) -> str:
    """A hash of every layer's mask: equal fingerprints mean the same pruned model."""
    return packed_fingerprint({name: packed(m) for name, m in masks.items()})


_BIT_VALUES = (128, 64, 32, 16, 8, 4, 2, 1)  # np.packbits' order: the first weight is the high bit


def packed(mask: torch.Tensor) -> np.ndarray:
    """A mask as bits, 1/8 of a byte per weight (what a per-block evaluation keeps of it),
    byte for byte np.packbits of the flattened mask. A mask on an accelerator is packed there,
    so only its bits cross to the host (a 7B candidate: 0.8 GB instead of 6.5 GB)."""
    if mask.device.type == "cpu":
        return np.packbits(mask.numpy())
    return packed_in_torch(mask).cpu().numpy()


def unpacked(bits: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """The boolean mask shaped and placed like `like`, from its packed bits (unpacked on the
    device of `like`, so only the bits travel there)."""
    if like.device.type == "cpu":
        flat = np.unpackbits(bits, count=like.numel()).view(np.bool_)
        return torch.from_numpy(flat).reshape(like.shape)
    return unpacked_in_torch(torch.from_numpy(bits).to(like.device), like)


def _bit_values(device) -> torch.Tensor:
    return torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=device)


def packed_in_torch(mask: torch.Tensor) -> torch.Tensor:
    """np.packbits of the flattened mask, computed on the mask's device (uint8)."""
    flat = mask.reshape(-1)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8).to(torch.uint8) * _bit_values(mask.device)).sum(1, dtype=torch.uint8)


def unpacked_in_torch(bits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of packed_in_torch, on the bits' device, shaped like `like`."""
    flat = (bits[:, None] & _bit_values(bits.device)).ne(0).reshape(-1)[:like.numel()]
    return flat.reshape(like.shape)


def packed_fingerprint(bits: dict[str, np.ndarray]) -> str:
    """fingerprint() from masks already packed (the same hash)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(bits):
        h.update(name.encode())
        h.update(bits[name].tobytes())
    return h.hexdigest()


def weights_fingerprint(weights: dict[str, torch.Tensor], update: Update, sequential: bool = False) -> str:
    """A hash of the update and every layer's reconstructed weights: with an adaptive update the
    mask alone does not decide the weights, so the fingerprint takes all their bytes."""
    h = weights_digest(update)
    if sequential:
        h.update(b"sequential")
    for name in sorted(weights):
        add_layer(h, name, weights[name])
    return h.hexdigest()


def weights_digest(update: Update):
    """The running hash of weights_fingerprint, before any layer (add them in sorted order)."""
    return hashlib.blake2b(repr(sorted(update.describe().items())).encode(), digest_size=16)


def add_layer(h, name: str, W: torch.Tensor) -> None:
    h.update(name.encode())
    h.update(memoryview(W.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))


@contextmanager
def _changed_block(per_layer: dict, i: int, block, change):
    """Block i with change(W, value) applied in place to each of its layers that `per_layer`
    names ("layers.{i}.{name}"), while it runs; each change returns its own undo."""
    undo = [change(matrix(lin), per_layer[f"layers.{i}.{name}"]) for name, lin in prunable_linears(block).items()
            if f"layers.{i}.{name}" in per_layer]
    try:
        yield
    finally:
        for u in undo:
            u()


def _replace(W: torch.Tensor, new: torch.Tensor):
    old = W.clone()
    W.copy_(new)
    return lambda: W.copy_(old)


def _prune(W: torch.Tensor, bits: np.ndarray):
    old = W.clone()   # a copy and a product: several times faster than gathering the pruned values
    W.mul_(unpacked(bits, W).logical_not())
    return lambda: W.copy_(old)


@dataclass
class Masked:
    """A mask-only candidate's pruned weights, kept as its masks: Evaluator.nll writes the
    masked weights into buffers it keeps, since allocating a fresh copy of every layer for each
    candidate took a sixth of a screening candidate's time on the CPU."""
    masks: dict[str, torch.Tensor]


class Evaluator:
    """Fitness of candidates on one model copy. A mask-only candidate is evaluated either on a
    masked copy of every prunable weight (the whole model at once, batched), or, per block
    (Setup.per_block, chosen automatically for models whose copy would not fit), with its masks
    kept as bits and applied in place to one decoder block at a time while all chunks pass
    through it, then undone from a copy of that block's pruned values: extra memory is one
    block's, never the model's. A recipe candidate (an update) per block is reconstructed one
    layer at a time into host memory, and each block takes its layers from there while it runs:
    the device holds one extra layer or block, the host one copy of the prunable weights."""

    def __init__(self, setup: Setup, model=None):
        if setup.threads:
            torch.set_num_threads(setup.threads)
        self.setup = setup
        self.model = model if model is not None else load_model(setup.model, setup.dtype, setup.device,
                                                                tokenizer=False)[0]
        self.layers = all_prunable(self.model)
        self.dense = {name: matrix(lin) for name, lin in self.layers.items()}
        device = next(self.model.parameters()).device
        self.update = Update(**setup.update)
        self.factors: dict = {}   # shared input -> factorise(H, update), made on first use, then kept
        self._scratch: dict = {}  # layer -> buffer of a mask-only candidate's weights (see nll)
        self._hessians = None
        self.device = execution_device(self.model)
        self.per_block = (setup.per_block if setup.per_block is not None
                          else onloading(self.model) or not copy_fits(self.layers.values()))
        # a model too big for whole copies reads its per-weight primitives (G) a layer at a time
        self.prims = {t: LazyLayers(source, self.device) if self.per_block and isinstance(source, str)
                      else _tensors(source, device) for t, source in setup.primitives.items()}

    def counts(self, allocation: dict | None) -> dict:
        """Weights each layer prunes under a candidate's allocation (the total exact), or None each."""
        if not allocation:
            return dict.fromkeys(self.dense)
        return layer_counts(self.layers, allocation, self.setup.sparsity)

    def masks(self, text: str, allocation: dict | None = None) -> dict[str, torch.Tensor]:
        m = Metric.parse(text)
        fn = m.compile()
        s, counts = self.setup, self.counts(allocation)
        return {name: metric_mask(name, W, fn, layer_primitives(name, m.terminals, self.prims, s.nsamples),
                                  s.sparsity, s.structure, m.group, counts[name])
                for name, W in self.dense.items()}

    def update_for(self, task: Task | None) -> Update:
        """The update a task's candidate is reconstructed with: its own spec, else the setup's."""
        return Update.parse(task.update) if task is not None and task.update else self.update

    def reconstructed(self, text: str, update: Update | None = None, allocation: dict | None = None) -> dict:
        """Every layer pruned by the metric and its kept weights updated (one-shot: from the
        dense model's Hessians, so each layer is independent of the others)."""
        m = Metric.parse(text)
        fn, counts = m.compile(), self.counts(allocation)
        return {name: self.reconstructed_layer(m, fn, name, update or self.update, counts[name]) for name in self.dense}

    def reconstructed_layer(self, m: Metric, fn, name: str, update: Update, count: int | None = None) -> torch.Tensor:
        s, W = self.setup, self.dense[name]
        score = scorer(name, fn, layer_primitives(name, m.terminals, self.prims, s.nsamples))
        return reconstruct(W, None, update, score, s.sparsity, s.structure, m.group, count,
                           factor=self.factor(name, update)).to(W.dtype)

    def reconstructed_in_host(self, text: str, update: Update, allocation: dict | None = None) -> tuple[str, dict]:
        """(fingerprint, every layer's reconstructed weights in host memory), made one layer at a
        time: the per-block path's recipe, whose device holds one extra layer at most. The
        fingerprint is weights_fingerprint's (the layers are hashed in the same order)."""
        m, h, out = Metric.parse(text), weights_digest(update), {}
        fn, counts = m.compile(), self.counts(allocation)
        for name in sorted(self.dense):
            W = self.reconstructed_layer(m, fn, name, update, counts[name])
            add_layer(h, name, W)
            out[name] = W.cpu()
        return h.hexdigest(), out

    def sequential_weights(self, text: str, update: Update | None = None,
                           allocation: dict | None = None) -> dict[str, torch.Tensor]:
        """Every layer's weights pruned as `apply` prunes them (prune.apply_metric, sequential,
        with the recipe's update) on the setup's calibration windows, into fresh tensors: the
        model's own dense weights are pointed back at after, untouched."""
        s = self.setup
        if s.calibration is None:
            raise ValueError("a sequential task needs calibration windows (Setup.calibration)")
        for name, lin in self.layers.items():
            set_matrix(lin, self.dense[name].clone())
        try:
            # G is the dense model's gradient either way: the cached one serves
            apply_metric(self.model, text, s.sparsity, s.structure, calibration=s.calibration, sequential=True,
                         grads=self.prims.get("G"), update=update or self.update,
                         allocation=LayerSparsity(allocation, {"kind": "searched"}) if allocation else "uniform",
                         progress=False)
            return {name: matrix(lin) for name, lin in self.layers.items()}
        finally:
            for name, lin in self.layers.items():
                set_matrix(lin, self.dense[name])

    def factor(self, name: str, update: Update):
        if self._hessians is None:
            if not self.setup.hessians:
                raise ValueError("a reconstructing task needs the dense Hessians (Setup.hessians)")
            device = next(self.model.parameters()).device
            self._hessians = (_tensors(self.setup.hessians, device),
                              shared_inputs(self.model, self.setup.chunks["search"]))
        H, owner = self._hessians
        # a factor depends on the input, the kind's family, the damping, rho and (admm-pcg) the refinement
        key = (owner[name], update.is_admm, update.damping, update.rho if update.is_admm else None,
               bool(update.refine_steps))
        if key not in self.factors:
            if len(self.factors) > 64:   # a searched update brings new settings: keep memory bounded
                self.factors.clear()
            self.factors[key] = factorise(H[owner[name]], update)
        return self.factors[key]

    def pruned(self, task: Task) -> tuple[str, dict[str, torch.Tensor]]:
        """(fingerprint, new weights of every layer) of a task's candidate."""
        if task.text == DENSE:
            return self.dense_fingerprint(), self.dense
        update, alloc = self.update_for(task), task.allocation
        if task.sequential:
            weights = self.sequential_weights(task.text, update, alloc)
            return weights_fingerprint(weights, update, sequential=True), weights
        if task.reconstruct:
            weights = self.reconstructed(task.text, update, alloc)
            return weights_fingerprint(weights, update), weights
        masks = self.masks(task.text, alloc)
        return fingerprint(masks), Masked(masks)

    def dense_fingerprint(self) -> str:
        return packed_fingerprint({n: np.zeros((w.numel() + 7) // 8, np.uint8) for n, w in self.dense.items()})

    def packed_masks(self, text: str, allocation: dict | None = None) -> tuple[str, dict[str, np.ndarray]]:
        """(fingerprint, every layer's mask as bits), scored one layer at a time."""
        if text == DENSE:
            return self.dense_fingerprint(), {}
        m = Metric.parse(text)
        fn, s, counts = m.compile(), self.setup, self.counts(allocation)
        # scored where the blocks run: one layer's weights visit the device of an onloaded model
        bits = {name: packed(metric_mask(name, W.to(self.device), fn,
                                         layer_primitives(name, m.terminals, self.prims, s.nsamples),
                                         s.sparsity, s.structure, m.group, counts[name]))
                for name, W in self.dense.items()}
        return packed_fingerprint(bits), bits

    def replaced_block(self, weights: dict, i: int, block):
        """Block i holding the `weights` given for its layers while it runs, then its own again."""
        return _changed_block(weights, i, block, _replace)

    def pruned_block(self, bits: dict, i: int, block):
        """Block i pruned in place by the masks `bits` (none: dense) while the block runs."""
        return _changed_block(bits, i, block, _prune)

    def nll(self, weights, chunks: torch.Tensor) -> tuple[float, int]:
        """NLL of the model with `weights` in its prunable layers (given Masked masks: the dense
        weights with those zeroed, written into buffers kept from one candidate to the next);
        the dense ones are put back after."""
        try:
            for name, lin in self.layers.items():
                if isinstance(weights, Masked):
                    if name not in self._scratch:
                        self._scratch[name] = torch.empty_like(self.dense[name])
                    set_matrix(lin, torch.mul(self.dense[name], weights.masks[name].logical_not(),
                                              out=self._scratch[name]))
                else:
                    set_matrix(lin, weights[name])
            return nll_sum(self.model, chunks, self.setup.batch_size, progress=False)
        finally:
            for name, lin in self.layers.items():
                set_matrix(lin, self.dense[name])

    def __call__(self, task: Task) -> Result:
        t0 = time.perf_counter()
        r = Result(task.text)
        try:
            if self.per_block:
                update, alloc = self.update_for(task), task.allocation
                if task.sequential and task.text != DENSE:
                    weights = {n: w.cpu() for n, w in self.sequential_weights(task.text, update, alloc).items()}
                    r.fingerprint = weights_fingerprint(weights, update, sequential=True)
                    around = functools.partial(self.replaced_block, weights)
                elif task.reconstruct and task.text != DENSE:
                    r.fingerprint, weights = self.reconstructed_in_host(task.text, update, alloc)
                    around = functools.partial(self.replaced_block, weights)
                else:
                    r.fingerprint, bits = self.packed_masks(task.text, alloc)
                    around = functools.partial(self.pruned_block, bits)
                measure = lambda chunks: nll_blockwise(self.model, chunks, around, progress=False)  # noqa: E731
            else:
                r.fingerprint, weights = self.pruned(task)
                measure = functools.partial(self.nll, weights)
            r.prune_s = time.perf_counter() - t0
            if task.chunks != "search":
                # the search's cache adds up NLL per fingerprint over the search chunks: the same
                # pruned model on another set (the shortened screen chunks) is another entry
                r.fingerprint = f"{r.fingerprint} on {task.chunks}"
            lo = max(task.lo, task.known.get(r.fingerprint, 0))
            if lo >= task.hi:
                r.cached, r.lo, r.hi = True, task.hi, task.hi
            else:
                r.lo, r.hi = lo, task.hi
                r.nll, r.tokens = measure(self.setup.chunks[task.chunks][lo:task.hi])
                if not math.isfinite(r.nll):
                    r.error = f"non-finite loss ({r.nll})"
        except Exception as e:  # noqa: BLE001 - any failing candidate gets the worst fitness, never a crash
            r.error = f"{type(e).__name__}: {e}"
        r.seconds = time.perf_counter() - t0
        return r

    evaluate = __call__  # Ray actors call methods by name
