"""The one definition of every operator of the metric language, in torch.

Operands are tensors that broadcast to the layer's (out, in) weight: matrices (out, in),
per-input-channel columns (1, in), per-row values (out, 1) or 0-dim scalars.
Protection, so no single operator produces NaN or infinity from finite input:

- div(a, b) = a * recip(b), recip(b) = 1 / b' where b' = b if |b| >= EPS, else EPS with
  the sign of b (+EPS for b = 0);
- log(a) = log(max(|a|, EPS)); sqrt(a) = sqrt(|a|); exp(a) = exp(min(a, EXP_MAX));
- mms and zsn return 0 where their input is constant.

Compositions can still overflow (exp(a) * exp(b)); scores are checked after the fact.
"""
from __future__ import annotations

import torch

EPS = 1e-30
EXP_MAX = 80.0


def add(a, b):
    return a + b


def sub(a, b):
    return a - b


def mul(a, b):
    return a * b


def recip(b):
    tiny = b.abs() < EPS
    safe = torch.where(tiny, torch.where(b < 0, -EPS, EPS).to(b.dtype), b)
    return 1.0 / safe


def div(a, b):
    return a * recip(b)


def abs(a):  # noqa: A001 - the language's name; the builtin is not used in this module
    return a.abs()


def neg(a):
    return -a


def sqr(a):
    return a * a


def sqrt(a):
    return torch.sqrt(a.abs())


def exp(a):
    return torch.exp(torch.clamp(a, max=EXP_MAX))


def log(a):
    return torch.log(torch.clamp(a.abs(), min=EPS))


def tanh(a):
    return torch.tanh(a)


def sigmoid(a):
    return torch.sigmoid(a)


def _scale(a, lo, span):
    # (a - lo) / span, and 0 where span is 0 (constant input), without creating NaNs
    ok = span > 0
    return torch.where(ok, (a - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(a))


def mms(a):
    lo, hi = a.amin(), a.amax()
    return _scale(a, lo, hi - lo)


def zsn(a):
    return _scale(a, a.mean(), a.std(correction=0))


def mms_row(a):
    if a.dim() < 2:
        return torch.zeros_like(a)
    lo, hi = a.amin(-1, keepdim=True), a.amax(-1, keepdim=True)
    return _scale(a, lo, hi - lo)


def zsn_row(a):
    if a.dim() < 2:
        return torch.zeros_like(a)
    return _scale(a, a.mean(-1, keepdim=True), a.std(-1, correction=0, keepdim=True))


def rowsum(a, shape):
    """Sum over the input dimension of `a` broadcast to `shape`: (out, 1)."""
    if a.dim() == 2 and a.shape[-1] == shape[-1]:
        return a.sum(-1, keepdim=True)
    return a * shape[-1]  # a is constant along the row: the sum is in_features copies


def colsum(a, shape):
    """Sum over the output dimension of `a` broadcast to `shape`: (1, in)."""
    if a.dim() == 2 and a.shape[0] == shape[0]:
        return a.sum(0, keepdim=True)
    return a * shape[0]


NEEDS_SHAPE = {"rowsum", "colsum"}
