"""SparseGPT (Frantar & Alistarh, 2023), the second-order baseline: each Linear is pruned
column block by column block, and every pruned weight's error is pushed onto the row's
not-yet-processed weights through the inverse of the layer-input Hessian H = sum_t x_t x_t^T
(the OBS update), so the layer's output on the calibration data changes as little as possible."""
from __future__ import annotations

import torch

from .calibration import Hessians
from .layers import matrix
from .masks import layer_mask, nm_mask
from .reconstruct import obs_sweep


def sparsegpt_weights(W: torch.Tensor, U: torch.Tensor, dead: torch.Tensor, sparsity: float,
                      nm: tuple[int, int] | None = None, blocksize: int = 128) -> torch.Tensor:
    """The pruned and reconstructed weights (fp32) of one Linear. U: upper Cholesky factor of
    H^-1 (from inverse_factor); nm: (n, m) for N:M, else unstructured at `sparsity`. The mask
    is chosen inside the sweep by the OBS saliency w^2 / [H^-1]_jj^2: per block over all rows
    (unstructured), per N:M group on the weights already updated by the sweep."""
    if nm is None:
        def choose(current, a, b, d):
            g = current[:, a:b]
            return layer_mask(g * g / (d * d), sparsity)
    else:
        def choose(current, a, b, d):
            g = current[:, a:b]
            return nm_mask(g * g / d ** 2, *nm)
    return obs_sweep(W, U, dead, choose, blocksize, nm and nm[1], group_only=True)


def prune_with_sparsegpt(linears: dict, hessians: Hessians, sparsity: float, nm=None,
                         percdamp: float = 0.01, blocksize: int = 128):
    """Prune `linears` in place from the Hessians recorded for them."""
    factors = hessians.factors(percdamp)
    for name, lin in linears.items():
        U, dead = factors[name]
        W = sparsegpt_weights(matrix(lin), U, dead, sparsity, nm, blocksize)
        matrix(lin).copy_(W.to(lin.weight.dtype))
