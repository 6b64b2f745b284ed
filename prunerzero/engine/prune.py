"""Prune a model in place with a metric: one-shot from dense primitives, or sequentially
(Wanda-style: each decoder block's X is recomputed through the already-pruned blocks)."""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from .. import progress
from ..progress import bar

from .calibration import Hessians, InputNorms, PairedHessians, compute_g, compute_h, compute_x
from .allocation import allocate
from .blocks import blockwise
from .tuning import tune_block
from ..language.compile import layer_primitives, scorer
from .masks import make_mask, measured_sparsity, parse_structure
from ..language.metric import Metric
from .layers import matrix
from ..errors import PrunerZeroError
from .models import all_prunable, require_prunable, skipped_layers
from .reconstruct import Update, dense_fitter, factorise, reconstruct
from ..language.space import recipe_defaults
from .sparsegpt import prune_with_sparsegpt

log = logging.getLogger(__name__)

NO_UPDATE = Update()


class PruneError(PrunerZeroError):
    """A pruning result that must not be used (or saved)."""


@dataclass
class PruneReport:
    metric: str
    canonical: str
    structure: str
    target_sparsity: float
    sparsity: float                      # measured: zeros / weights over pruned layers
    layers: dict[str, float]             # measured, per layer
    sequential: bool
    group: str = "row"                   # comparison group of the masks
    skipped: dict = field(default_factory=dict)   # weights left alone, with the reason
    update: dict = field(default_factory=lambda: {"kind": "none"})   # reconstruction and its parameters
    allocation: dict = field(default_factory=lambda: {"kind": "uniform"})  # per-layer sparsity
    perplexity: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def metric_mask(name, W, fn, prims, sparsity, structure, group="row", count=None) -> torch.Tensor:
    """The pruning mask (True = prune) of one layer's weights under a compiled metric."""
    return make_mask(scorer(name, fn, prims)(W), sparsity, structure, group, count)


def _prune_linear(name, linear, fn, prims, sparsity, structure, group="row", update: Update = NO_UPDATE, factor=None,
                  count=None, fit=None):
    """Prune one layer by the metric's mask (exactly `count` weights when an allocation gives
    one) and, with an update, reconstruct its kept weights (factor: factorise(H, update) of
    its input Hessian; fit: reconstruct.dense_fitter's function, which moves the weights to the
    dense-output fit first)."""
    W = matrix(linear)
    if update.kind == "none":
        W[metric_mask(name, W, fn, prims, sparsity, structure, group, count)] = 0
    else:
        start = W if fit is None else fit(W)
        W.copy_(reconstruct(start, None, update, scorer(name, fn, prims), sparsity, structure, group, count,
                            factor).to(W.dtype))


def apply_metric(model, metric, sparsity: float = 0.5, structure: str = "unstructured",
                 calibration: torch.Tensor | None = None, sequential: bool = True,
                 grads: dict | None = None, x_norms: dict | None = None, curvature: dict | None = None,
                 group: str | None = None, update: str | Update | None = None, allocation=None,
                 progress: bool = True) -> PruneReport:
    """Prune `model` in place with `metric` (text, catalog name or Metric) and report.

    calibration: (nsamples, seqlen) token ids, needed for X (unless `x_norms` is given for
    one-shot) and for G when the metric uses it (unless `grads` is given); likewise H
    (`curvature`, one-shot only). group: "row" or "layer" comparison for unstructured masks
    (default: the catalog's for named metrics, else "row"). update: reconstruction of the kept
    weights after each layer's mask ("none", "obs", "obs-adaptive", "admm", or an Update with
    its parameters; see reconstruct.py), from the layer-input Hessians of the calibration data.
    allocation: "uniform", "owl" or a LayerSparsity (a searched allocation: prunerzero.apply_metric
    resolves "search" before it calls this), with the total exact. update and allocation default
    to a catalogued recipe's (e.g. "wanda-admm"), else none and uniform.
    """
    nm = parse_structure(structure, sparsity)
    require_prunable(model)
    m = Metric.parse(metric) if not isinstance(metric, Metric) else metric
    update, allocation = recipe_defaults(m.name, update, allocation)
    update = Update.parse(update)
    fn, uses = m.compile(), m.terminals
    group = group or m.group
    timings = {}
    t0 = time.perf_counter()
    if "G" in uses and grads is None:
        grads = compute_g(model, _need(calibration, "G"))
        timings["gradients_s"] = time.perf_counter() - t0
    n = len(calibration) if calibration is not None else 0
    counts, allocated = allocate(allocation, model, all_prunable(model),
                                 None if allocation == "uniform" else _need(calibration, "a per-layer allocation"),
                                 sparsity, structure, progress)
    reconstructs = update.kind != "none" or update.tune > 0
    # nothing to recompute between blocks unless the metric reads activations or weights are updated
    sequential = sequential and (bool(uses & {"X", "H"}) or reconstructs)
    t1 = time.perf_counter()
    if sequential or reconstructs:  # one-shot reconstruction: block by block on the dense activations
        _prune_sequential(model, fn, uses, _need(calibration, "X"), grads, sparsity, structure, group, progress,
                          update, counts, dense=not sequential)
    else:
        if "X" in uses and x_norms is None:
            x_norms = compute_x(model, _need(calibration, "X"))
        if "H" in uses and curvature is None:
            curvature = compute_h(model, _need(calibration, "H"))
        stats = {"X": x_norms, "G": grads, "H": curvature}
        for name, lin in bar(all_prunable(model).items(), desc="pruning", enabled=progress):
            _prune_linear(name, lin, fn, layer_primitives(name, uses, stats, n), sparsity, structure, group,
                          count=counts and counts[name])
    timings["prune_s"] = time.perf_counter() - t1
    total, per = measured_sparsity(all_prunable(model))
    return PruneReport(metric=m.name or m.text, canonical=m.canonical(), structure=structure,
                       target_sparsity=_target(sparsity, nm), sparsity=total, layers=per, sequential=sequential,
                       timings=timings, group=group if nm is None else f"{nm[1]} consecutive inputs",
                       skipped=skipped_layers(model), update=update.describe(), allocation=allocated)


def _target(sparsity, nm):
    return sparsity if nm is None else nm[0] / nm[1]


def _need(calibration, what):
    if calibration is None:
        raise ValueError(f"this metric needs calibration samples to compute {what}")
    return calibration


def _prune_sequential(model, fn, uses, calibration, grads, sparsity, structure, group, progress,
                      update: Update = NO_UPDATE, counts=None, dense: bool = False):
    # H (the terminal, or the reconstruction) needs the full input covariance; X alone only its diagonal
    needs_h = "H" in uses or update.kind != "none"
    # fitting the dense output needs the dense stream beside the pruned one (not in one-shot,
    # where the two are the same and the fit is the layer's own)
    paired = update.correct > 0 and not dense

    def prune_block(i, linears, rec):
        _prune_block_layers(f"layers.{i}.", linears, rec, fn, uses, grads, len(calibration), sparsity, structure,
                            group, update, counts)
    recorder = PairedHessians if paired else Hessians if needs_h else InputNorms
    if update.dense_windows and not (paired or update.tune):
        log.warning("dense_windows=%d has no effect: only correct= (in sequential pruning) and tune= use "
                    "the dense stream", update.dense_windows)
    tune = None
    if update.tune:
        tune = functools.partial(tune_block, epochs=update.tune, lr=update.tune_lr)
    blockwise(model, calibration, recorder, prune_block, progress, dense=dense, paired=paired,
              staged=bool(update.staged), tune=tune, dense_windows=update.dense_windows)


def _prune_block_layers(prefix, linears, rec, fn, uses, grads, n, sparsity, structure, group, update, counts=None):
    """Prune `linears` from the statistics `rec` recorded on their inputs (Hessians or InputNorms)."""
    hessians = isinstance(rec, Hessians)
    local = rec.x_norms() if hessians else rec.norms()
    stats = {"G": grads, "X": {prefix + k: v for k, v in local.items()}}
    if "H" in uses:
        stats["H"] = {prefix + k: v for k, v in rec.curvature().items()}
    factors, fits = {}, {}  # one factorisation (and dense fit) per shared Hessian (q/k/v, gate/up)
    for name, lin in linears.items():
        factor = fit = None
        if hessians and update.kind != "none":
            owner = rec.owner[name]
            factor = factors[owner] = factors.get(owner) or factorise(rec.H[owner], update)
            K = rec.cross(owner) if isinstance(rec, PairedHessians) else None
            if K is not None:
                fit = fits[owner] = fits.get(owner) or dense_fitter(rec.H[owner], K, update)
        _prune_linear(prefix + name, lin, fn, layer_primitives(prefix + name, uses, stats, n), sparsity, structure,
                      group, update, factor, counts and counts[prefix + name], fit)


def apply_sparsegpt(model, sparsity: float = 0.5, structure: str = "unstructured",
                    calibration: torch.Tensor | None = None, sequential: bool = True,
                    percdamp: float = 0.01, blocksize: int = 128, progress: bool = True) -> PruneReport:
    """Prune `model` in place with SparseGPT (OBS weight reconstruction) and report."""
    nm = parse_structure(structure, sparsity)
    require_prunable(model)
    samples = _need(calibration, "the layer Hessians")
    t0 = time.perf_counter()
    prune = lambda linears, rec: prune_with_sparsegpt(linears, rec, sparsity, nm, percdamp, blocksize)  # noqa: E731
    # one-shot: the same walk on the dense activations, so only one block's Hessians are held
    blockwise(model, samples, Hessians, lambda i, linears, rec: prune(linears, rec), progress, dense=not sequential)
    timings = {"prune_s": time.perf_counter() - t0}
    total, per = measured_sparsity(all_prunable(model))
    return PruneReport(metric="sparsegpt", canonical=f"SparseGPT (percdamp {percdamp}, blocksize {blocksize})",
                       structure=structure, target_sparsity=_target(sparsity, nm), sparsity=total, layers=per,
                       sequential=sequential, timings=timings,
                       group=f"{blocksize}-column blocks" if nm is None else f"{nm[1]} consecutive inputs",
                       skipped=skipped_layers(model),
                       update={"kind": "sparsegpt", "percdamp": percdamp, "blocksize": blocksize})
