"""Rank-equivalence keys: metrics that share a key give the same per-row pruning masks.

Masks keep the highest scores of each output row, so a score s and f(s) rank alike when
f is strictly increasing, and s and c*s + d rank alike when c > 0 and d are constant
along each row. `rank_core` strips such wrappers from a simplified form:

1. terms constant along rows are dropped from sums (s + d -> s);
2. positive factors constant along rows are dropped from products (c * s -> s); a
   negative numeric factor is kept as an overall sign;
3. strictly increasing functions are removed from the top: exp, tanh, sigmoid, the
   normalisers mms, zsn, mms_row, zsn_row, log and positive powers of a non-negative
   argument;
4. a product of non-negative factors b_i**p_i is raised to the power that makes its
   exponents coprime integers (sqr(W)*mms(G) and abs(W)*sqrt(mms(G)) -> sqr(W)*mms(G)).

The key is exact in real arithmetic, and sufficient, not necessary: log(a) + log(b) and
a*b rank alike but get different keys. In floating point, equal keys can still give
different masks where a stripped function saturates (tanh(50) == 1.0, sigmoid, the exp
clamp at EXP_MAX, log below EPS) or a large added constant absorbs the scores (x + 1e30).
So the key serves diversity (OOS in the search) and cheap de-duplication; fitness caches
are keyed by a fingerprint of the masks actually produced.
"""
from __future__ import annotations

import math
from functools import reduce

import sympy

from .symbolic import NORMALISERS, Exp, Log, Sigmoid, Tanh, varies_along_row

_INCREASING = (Exp, Tanh, Sigmoid, *NORMALISERS)


def rank_core(e: sympy.Expr) -> sympy.Expr:
    """The simplest form that ranks every row's weights exactly as `e` does."""
    sign = 1
    for _ in range(100):
        new, flip = _step(e)
        sign *= flip
        if new == e:
            break
        e = new
    return -e if sign < 0 else e


def _step(e: sympy.Expr) -> tuple[sympy.Expr, int]:
    if isinstance(e, sympy.Add):
        kept = [t for t in e.args if varies_along_row(t)]
        return sympy.Add(*kept), 1
    if isinstance(e, sympy.Mul):
        return _step_mul(e)
    if isinstance(e, _INCREASING):
        return e.args[0], 1
    if isinstance(e, Log) and e.args[0].is_nonnegative:
        return e.args[0], 1
    if isinstance(e, sympy.Pow) and e.exp.is_positive and e.base.is_nonnegative:
        return e.base, 1
    return e, 1


def _step_mul(e: sympy.Mul) -> tuple[sympy.Expr, int]:
    flip = 1
    kept = []
    for f in e.args:
        if varies_along_row(f):
            kept.append(f)
        elif f.is_positive:
            continue
        elif f.is_negative:
            flip = -flip
        else:
            kept.append(f)  # row-constant of unknown sign: it may reverse a row's ranking
    core = sympy.Mul(*kept)
    if isinstance(core, sympy.Mul) and all(f.is_nonnegative for f in core.args):
        core = _coprime_powers(core)
    return core, flip


def _coprime_powers(e: sympy.Mul) -> sympy.Expr:
    powers = []
    for f in e.args:
        base, p = f.as_base_exp()
        if not (p.is_Rational and p > 0):
            return e
        if p.q == 1 and p.p % 2 == 0 and not base.is_nonnegative:
            base = sympy.Abs(base)  # W**2 = abs(W)**2: one base for all powers of W
        powers.append((base, p))
    den = reduce(math.lcm, (int(p.q) for _, p in powers))
    nums = [int(p * den) for _, p in powers]
    g = reduce(math.gcd, nums)
    return sympy.Mul(*[b ** sympy.Integer(n // g) for (b, _), n in zip(powers, nums)])
