"""Block tuning (Update.tune): after a decoder block's layers are pruned and reconstructed one
at a time, its kept weights are tuned together so that the block, fed the inputs the pruned
earlier blocks give it, reproduces the dense block's outputs on the dense stream. A layer-wise
fit sees only its own output; here the later layers of the block make up for the earlier
ones' error and the whole block for what earlier blocks passed on (reconstruction at the
granularity of a block, as the "free lunch" study of pruned LLMs, arXiv 2510.14444, argues
for). Pruned weights stay exactly zero: their gradients are masked, so Adam never moves them."""
from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from torch import nn

from .blocks import as_dtype, running_in
from .passes import batched, block_output

log = logging.getLogger(__name__)

HALF = (torch.float16, torch.bfloat16)


def tunable_weights(linears: dict) -> list[nn.Parameter]:
    """The weight Parameters of the pruned layers, once each. Expert projections that are views
    into a fused tensor are not Parameters of their own and stay as reconstructed."""
    seen: dict[int, nn.Parameter] = {}
    for m in linears.values():
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter):
            seen.setdefault(id(w), w)
    return list(seen.values())


def tune_block(block, linears: dict, inputs: list, targets: list, call, epochs: int, lr: float) -> float:
    """`epochs` passes of Adam (learning rate `lr`) over the calibration windows, one window a
    step in a fixed order (so a run takes the same steps on any device), on the mean squared
    error between the block's outputs for `inputs` and `targets` (the dense block's outputs),
    moving only the kept weights of `linears`. Half-precision weights are tuned in fp32 and
    rounded back once at the end (Adam's small steps would vanish in bf16). Returns the mean
    error of the first epoch relative to the targets' mean square (relative_error measures it
    after, at the cost of a pass; the walk's own next pass gives the outputs)."""
    weights = tunable_weights(linears)
    if not weights or epochs <= 0 or not inputs:
        return float("nan")
    upcast = any(w.dtype in HALF for w in weights)
    with running_in(block, torch.float32) if upcast else nullcontext():
        if upcast:
            inputs, call = as_dtype(inputs, call, torch.float32)
            targets, _ = as_dtype(targets, call, torch.float32)
        first = _fit(block, weights, inputs, targets, call, epochs, lr)
    log.debug("block tuning: relative error %.4g in the first epoch", first)
    return first


def _fit(block, weights, inputs, targets, call, epochs, lr) -> float:
    """Adam on `weights` (others frozen meanwhile), gradients masked to the kept entries; the
    mean relative error over the first epoch."""
    keep = [w.data != 0 for w in weights]
    frozen = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    opt = torch.optim.Adam(weights, lr=lr)
    scale = _mean_square(targets)
    first, steps = 0.0, 0
    try:
        with torch.enable_grad():
            for epoch in range(epochs):
                for x, y in zip(inputs, targets):
                    loss = torch.nn.functional.mse_loss(block_output(block, x, call).float(), y.float())
                    opt.zero_grad(set_to_none=False)
                    loss.backward()
                    for w, k in zip(weights, keep):
                        w.grad.mul_(k)
                    opt.step()
                    if epoch == 0:
                        first, steps = first + float(loss.detach()), steps + 1
    finally:
        for w in weights:
            w.grad = None
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    with torch.no_grad():   # Adam leaves a masked entry at exactly zero; this keeps it so regardless
        for w, k in zip(weights, keep):
            w.data.mul_(k)
    return first / max(steps, 1) / scale


@torch.no_grad()
def relative_error(block, inputs, targets, call, batch=None) -> float:
    """The block's mean squared error against `targets`, relative to their mean square."""
    total, n = 0.0, 0
    for x, y in zip(batched(inputs, batch), batched(targets, batch)):
        total += float(torch.nn.functional.mse_loss(block_output(block, x, call).float(), y.float()))
        n += 1
    return total / max(n, 1) / _mean_square(targets)


def _mean_square(tensors) -> float:
    total = sum(float(t.float().pow(2).sum()) for t in tensors)
    count = sum(t.numel() for t in tensors)
    return max(total / max(count, 1), torch.finfo(torch.float32).tiny)
