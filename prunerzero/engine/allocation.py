"""Per-layer sparsity: how many weights each layer prunes, with the total over all prunable
weights exact to the weight.

- `uniform`: every layer at the requested sparsity (int(in * sparsity) per row, the published
  protocol).
- `owl`: Outlier-Weighted Layerwise sparsity (Yin et al., 2024): a decoder block whose Wanda
  scores |W| * X hold more outliers (scores above M times the block's mean) keeps more weights.
  The blocks' outlier ratios are scaled to [0, 2*lambda], centred, and subtracted from the
  target, so block sparsities lie within target +- lambda (M = 5, lambda = 0.08 as published);
  X comes from one pass of the dense model, block by block.
- a `LayerSparsity`: each layer's sparsity decided above the engine, by the allocation search
  (EvoPress-style, search/allocation.py; `prunerzero.apply_metric` runs it for allocation="search").
  The engine never calls into a search.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import progress
from .blocks import blockwise
from .calibration import InputNorms
from .. import checks
from ..checks import SettingsError
from .layers import matrix

ALLOCATIONS = ("uniform", "owl", "search")
OWL_M, OWL_LAMBDA = 5.0, 0.08   # the published outlier threshold and sparsity spread


@dataclass
class LayerSparsity:
    """An allocation found elsewhere: the sparsity of each prunable layer, and its report."""
    sparsity: dict
    report: dict


def check_allocation(kind: str, structure: str) -> None:
    """A known allocation, and a non-uniform one only for unstructured sparsity."""
    checks.choice("allocation", kind, ALLOCATIONS)
    if kind != "uniform" and structure != "unstructured":
        raise SettingsError(f"--allocation {kind} needs unstructured sparsity: N:M keeps one pattern in every layer")


def owl_block_sparsities(model, samples: torch.Tensor, sparsity: float, m: float = OWL_M, lam: float = OWL_LAMBDA,
                         progress: bool = True) -> list[float]:
    """The sparsity of each decoder block under OWL, from the dense model's activations."""
    ratios = []

    def outliers(i, linears, rec):  # records only: the walk stays dense
        x = rec.norms()
        scores = torch.cat([(matrix(lin).abs().float() * x[name]).reshape(-1) for name, lin in linears.items()])
        ratios.append(float((scores > m * scores.mean()).float().mean()))
    blockwise(model, samples, InputNorms, outliers, progress, desc="outlier ratios")
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = r.max() - r.min()
    scaled = (r - r.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(r)
    return [float(sparsity - (v - scaled.mean())) for v in scaled]


def layer_counts(layers: dict, sparsity_of: dict[str, float], sparsity: float) -> dict[str, int]:
    """Weights to prune per layer: proportional to each layer's allocated sparsity, scaled so the
    total is int(total weights * sparsity) exactly (largest remainders take the spare weights),
    and never all of a layer."""
    sizes = {name: matrix(lin).numel() for name, lin in layers.items()}
    target = int(sum(sizes.values()) * sparsity)
    ideal = {name: sizes[name] * sparsity_of[name] for name in sizes}
    scale = target / sum(ideal.values()) if sum(ideal.values()) else 0.0
    want = {name: min(ideal[name] * scale, sizes[name] - 1) for name in sizes}
    counts = {name: int(v) for name, v in want.items()}
    spare = target - sum(counts.values())
    for name in sorted(want, key=lambda n: counts[n] - want[n])[:max(spare, 0)]:
        counts[name] += 1
    if sum(counts.values()) != target:
        raise SettingsError(f"--allocation cannot place {target} pruned weights in these layers")
    return counts


def allocate(kind, model, layers: dict, samples, sparsity: float, structure: str,
             progress: bool = True) -> tuple[dict[str, int] | None, dict]:
    """(weights to prune per layer, or None for uniform; what to write in the report). kind:
    "uniform", "owl", or a LayerSparsity (a searched allocation, resolved by the caller)."""
    if isinstance(kind, LayerSparsity):
        check_allocation("search", structure)
        return layer_counts(layers, kind.sparsity, sparsity), kind.report
    if kind == "search" or not isinstance(kind, str):  # "search", or a search's settings object
        raise SettingsError("an allocation search runs above the engine: prune with prunerzero.apply_metric "
                            "(or give engine.prune.apply_metric the LayerSparsity that search_allocation finds)")
    check_allocation(kind, structure)
    if kind == "uniform":
        return None, {"kind": "uniform"}
    blocks = owl_block_sparsities(model, samples, sparsity, progress=progress)
    per_layer = {name: blocks[int(name.split(".")[1])] for name in layers}
    return layer_counts(layers, per_layer, sparsity), {"kind": "owl", "M": OWL_M, "lambda": OWL_LAMBDA,
                                                       "block_sparsity": [round(b, 6) for b in blocks]}
