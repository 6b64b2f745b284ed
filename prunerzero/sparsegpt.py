"""SparseGPT (Frantar & Alistarh, 2023), the second-order baseline: each Linear is pruned
column block by column block, and every pruned weight's error is pushed onto the row's
not-yet-processed weights through the inverse of the layer-input Hessian H = sum_t x_t x_t^T
(the OBS update), so the layer's output on the calibration data changes as little as possible."""
from __future__ import annotations

import torch

from .calibration import Hessians
from .layers import matrix
from .masks import layer_mask, nm_mask


class SparseGPTError(RuntimeError):
    pass


def inverse_factor(H: torch.Tensor, percdamp: float = 0.01, retries: int = 4):
    """U with U^T U = (H + damp I)^-1, damp = percdamp * mean(diag H); channels that never
    fire (diag 0) get a unit diagonal and their weights are dropped. If H is numerically
    not positive definite, the damping grows tenfold per retry."""
    H = H.clone()
    dead = H.diagonal() == 0
    if dead.all():
        # a layer that saw no calibration token (an MoE expert no sample was routed to): no
        # curvature to go by, so prune by magnitude without an update rather than drop it all
        H, dead = torch.eye(len(H), dtype=H.dtype, device=H.device), torch.zeros_like(dead)
    H[dead, dead] = 1
    damp = percdamp * H.diagonal().mean()
    for _ in range(retries + 1):
        L, info = torch.linalg.cholesky_ex(H + damp * torch.eye(len(H), device=H.device))
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True), dead
        damp = damp * 10
    raise SparseGPTError("the calibration Hessian is not positive definite even with heavy damping; "
                         "use more calibration samples")


@torch.no_grad()
def sparsegpt_weights(W: torch.Tensor, U: torch.Tensor, dead: torch.Tensor, sparsity: float,
                      nm: tuple[int, int] | None = None, blocksize: int = 128) -> torch.Tensor:
    """The pruned and reconstructed weights (fp32) of one Linear. U: upper Cholesky factor of
    H^-1 (from inverse_factor); nm: (n, m) for N:M, else unstructured at `sparsity`."""
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M = {nm[1]}")
    W = W.float().clone()
    W[:, dead] = 0
    cols = W.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = U1.diagonal()
        # unstructured: the lowest OBS saliencies w^2 / [H^-1]_jj^2 over the whole block (all rows)
        mask = layer_mask(W1 * W1 / (d * d), sparsity) if nm is None else torch.zeros_like(W1, dtype=torch.bool)
        err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                # N:M groups are chosen as the sweep reaches them, on the already-updated weights
                g = W1[:, i:i + nm[1]]
                mask[:, i:i + nm[1]] = nm_mask(g * g / d[i:i + nm[1]] ** 2, *nm)
            w = W1[:, i]
            e = torch.where(mask[:, i], w, 0) / d[i]
            W1[:, i:].sub_(torch.outer(e, U1[i, i:]))   # also sets W1[:, i] to the kept value (or 0)
            W1[mask[:, i], i] = 0
            err[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:].sub_(err @ U[i1:i2, i2:])
    return W


def prune_with_sparsegpt(linears: dict, hessians: Hessians, sparsity: float, nm=None,
                         percdamp: float = 0.01, blocksize: int = 128):
    """Prune `linears` in place from the Hessians recorded for them."""
    factors = hessians.factors(percdamp)
    for name, lin in linears.items():
        U, dead = factors[name]
        W = sparsegpt_weights(matrix(lin), U, dead, sparsity, nm, blocksize)
        matrix(lin).copy_(W.to(lin.weight.dtype))
