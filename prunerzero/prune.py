"""Prune a model in place with a metric: one-shot from dense primitives, or sequentially
(Wanda-style: each decoder block's X is recomputed through the already-pruned blocks)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .calibration import compute_g, compute_x, input_norms
from .compile import check_scores
from .masks import make_mask, measured_sparsity, parse_structure
from .metric import Metric
from .models import all_prunable, decoder_layers, prunable_linears
from .sparsegpt import Hessians, prune_with_sparsegpt


@dataclass
class PruneReport:
    metric: str
    canonical: str
    structure: str
    target_sparsity: float
    sparsity: float                      # measured: zeros / weights over pruned layers
    layers: dict[str, float]             # measured, per layer
    sequential: bool
    perplexity: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class _Stop(Exception):
    pass


@torch.no_grad()
def _block_inputs(model, samples: torch.Tensor):
    """Hidden states entering the first decoder block for each sample, and its call kwargs."""
    first = decoder_layers(model)[0]
    device = next(model.parameters()).device
    inputs, call = [], {}

    def grab(module, args, kwargs):
        inputs.append(args[0] if args else kwargs.pop("hidden_states"))
        call.update(kwargs)
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(len(samples)):
            try:
                model(samples[i:i + 1].to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return inputs, call


def _run_block(block, inputs, call):
    outs = []
    for x in inputs:
        y = block(x, **call)
        outs.append(y[0] if isinstance(y, tuple) else y)
    return outs


def _prune_linear(name, linear, fn, prims, sparsity, structure):
    W = linear.weight.data
    scores = fn(W, **prims)
    check_scores(scores, where=name)
    W[make_mask(scores, sparsity, structure)] = 0


def apply_metric(model, metric, sparsity: float = 0.5, structure: str = "unstructured",
                 calibration: torch.Tensor | None = None, sequential: bool = True,
                 grads: dict | None = None, x_norms: dict | None = None, progress: bool = True) -> PruneReport:
    """Prune `model` in place with `metric` (text, catalog name or Metric) and report.

    calibration: (nsamples, seqlen) token ids, needed for X (unless `x_norms` is given for
    one-shot) and for G when the metric uses it (unless `grads` is given).
    """
    nm = parse_structure(structure, sparsity)
    m = Metric.parse(metric) if not isinstance(metric, Metric) else metric
    fn, uses = m.compile(), m.terminals
    timings = {}
    t0 = time.perf_counter()
    if "G" in uses and grads is None:
        grads = compute_g(model, _need(calibration, "G"))
        timings["gradients_s"] = time.perf_counter() - t0
    n = len(calibration) if calibration is not None else 0
    t1 = time.perf_counter()
    if sequential:
        _prune_sequential(model, fn, uses, _need(calibration, "X"), grads, sparsity, structure, progress)
    else:
        if "X" in uses and x_norms is None:
            x_norms = compute_x(model, _need(calibration, "X"))
        for name, lin in tqdm(all_prunable(model).items(), desc="pruning", disable=not progress, leave=False):
            prims = _prims(name, uses, x_norms, grads, n)
            _prune_linear(name, lin, fn, prims, sparsity, structure)
    timings["prune_s"] = time.perf_counter() - t1
    total, per = measured_sparsity(all_prunable(model))
    return PruneReport(metric=m.name or m.text, canonical=m.canonical(), structure=structure,
                       target_sparsity=_target(sparsity, nm), sparsity=total, layers=per, sequential=sequential,
                       timings=timings)


def _target(sparsity, nm):
    return sparsity if nm is None else nm[0] / nm[1]


def _need(calibration, what):
    if calibration is None:
        raise ValueError(f"this metric needs calibration samples to compute {what}")
    return calibration


def _prims(name, uses, x_norms, grads, n):
    p = {}
    if "X" in uses:
        p["X"] = x_norms[name]
    if "G" in uses:
        p["G"] = grads[name]
    if "N" in uses:
        p["N"] = n
    return p


def _prune_sequential(model, fn, uses, calibration, grads, sparsity, structure, progress):
    def prune_block(i, linears, rec):
        x_norms = {f"layers.{i}.{k}": v for k, v in rec.norms().items()}
        for name, lin in linears.items():
            full = f"layers.{i}.{name}"
            _prune_linear(full, lin, fn, _prims(full, uses, x_norms, grads, len(calibration)), sparsity, structure)
    _blockwise(model, calibration, input_norms, prune_block, progress)


def _blockwise(model, calibration, recorder, prune_block, progress):
    """Sequential pruning: record each block's inputs statistics with `recorder`, prune it with
    `prune_block(index, linears, recorder)`, and pass the calibration activations through the
    pruned block to the next one."""
    inputs, call = _block_inputs(model, calibration)
    blocks = decoder_layers(model)
    for i, block in enumerate(tqdm(blocks, desc="pruning blocks", disable=not progress, leave=False)):
        linears = prunable_linears(block)
        with torch.no_grad(), recorder(linears) as rec:
            _run_block(block, inputs, call)
        prune_block(i, linears, rec)
        with torch.no_grad():
            inputs = _run_block(block, inputs, call)


def apply_sparsegpt(model, sparsity: float = 0.5, structure: str = "unstructured",
                    calibration: torch.Tensor | None = None, sequential: bool = True,
                    percdamp: float = 0.01, blocksize: int = 128, progress: bool = True) -> PruneReport:
    """Prune `model` in place with SparseGPT (OBS weight reconstruction) and report."""
    nm = parse_structure(structure, sparsity)
    samples = _need(calibration, "the layer Hessians")
    t0 = time.perf_counter()
    prune = lambda linears, rec: prune_with_sparsegpt(linears, rec, sparsity, nm, percdamp, blocksize)  # noqa: E731
    if sequential:
        _blockwise(model, samples, Hessians, lambda i, linears, rec: prune(linears, rec), progress)
    else:
        linears = all_prunable(model)
        device = next(model.parameters()).device
        with torch.no_grad(), Hessians(linears) as rec:
            for s in samples:
                model(s[None].to(device))
        prune(linears, rec)
    timings = {"prune_s": time.perf_counter() - t0}
    total, per = measured_sparsity(all_prunable(model))
    return PruneReport(metric="sparsegpt", canonical=f"SparseGPT (percdamp {percdamp}, blocksize {blocksize})",
                       structure=structure, target_sparsity=_target(sparsity, nm), sparsity=total, layers=per,
                       sequential=sequential, timings=timings)
