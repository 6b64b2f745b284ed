"""Opposing Operation Simplification (OOS): rewrite rules that remove operations which
undo each other, so that the search sees one form for metrics that compute the same thing.

Two kinds of rule apply:

* sympy's automatic arithmetic, exact for real numbers, applied whenever a form is built:
  neg(neg(x)) = x, abs(abs(x)) = abs(x), abs(x) = x for x >= 0, x - x = 0, x * 1 = x,
  x + 0 = x, x * 0 = 0, sqrt(sqr(x)) = abs(x), sqr(sqrt(x)) = abs(x), x * x = sqr(x).
* the rules in RULES below, for the protected operators sympy treats as opaque. Each says
  where it is exact; "band" rules differ only where a protection triggers (|x| < EPS = 1e-30
  or an exp argument above EXP_MAX = 80), which finite fp32 weights and statistics of a
  trained model do not reach except at exact zeros.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import sympy

from .symbolic import GLOBAL_NORMALISERS, NORMALISERS, Exp, Log, Recip, varies_over_scope


@dataclass(frozen=True)
class Rule:
    name: str
    doc: str
    exact: str       # "exact", or where it differs
    apply: Callable[[sympy.Expr], sympy.Expr | None]


def _exp_log(e):
    if isinstance(e, Exp) and isinstance(e.args[0], Log):
        return sympy.Abs(e.args[0].args[0])


def _log_exp(e):
    if isinstance(e, Log) and isinstance(e.args[0], Exp):
        return e.args[0].args[0]


def _recip_recip(e):
    if isinstance(e, Recip) and isinstance(e.args[0], Recip):
        return e.args[0].args[0]


def _log_recip(e):
    if isinstance(e, Log) and isinstance(e.args[0], Recip):
        return -Log(e.args[0].args[0])


def _cancel(e):
    """x*y/(x*z) -> y/z, x/x -> 1, sqr(x)/x -> x: cancel factors common to a quotient."""
    if not isinstance(e, sympy.Mul):
        return None
    num = sympy.Mul(*[f for f in e.args if not isinstance(f, Recip)]).as_powers_dict()
    for f in e.args:
        if not isinstance(f, Recip):
            continue
        common = sympy.Integer(1)
        for base, p in f.args[0].as_powers_dict().items():
            q = num.get(base, 0)
            if not base.is_Number and p.is_Integer and getattr(q, "is_Integer", False):
                common *= base ** min(p, q)
        if common != 1:
            return e / f / common * Recip(f.args[0] / common)
    return None


def _normaliser_of_constant(e):
    """mms(a) -> 0 (and zsn, the row variants) where a cannot vary over the normaliser's scope
    (a scalar; a per-row value inside a row-wise one): ops define that as 0. Checked before the
    affine rule, whose mms(-a) = 1 - mms(a) holds only for an `a` that varies."""
    if isinstance(e, NORMALISERS) and not varies_over_scope(e):
        return sympy.Integer(0)


def _normaliser_of_affine(e):
    """mms(c*x + d) -> mms(x) for numbers c > 0, d (also zsn and the row variants);
    c < 0 gives 1 - mms(x) and -zsn(x)."""
    if not isinstance(e, NORMALISERS):
        return None
    arg = e.args[0]
    d, rest = arg.as_coeff_Add()
    c, core = rest.as_coeff_Mul()
    if (d == 0 and c == 1) or core.is_Number:
        return None
    inner = type(e)(core)
    if c > 0:
        return inner
    return 1 - inner if type(e).__name__.startswith("MMS") else -inner


def _normaliser_of_normaliser(e):
    """N(M(x)) -> N(x) where M is one positive-affine map of x that N undoes: any N over a
    whole-matrix M, a row-wise N over a row-wise M."""
    if not isinstance(e, NORMALISERS) or not isinstance(e.args[0], NORMALISERS):
        return None
    inner = e.args[0]
    row_outer = not isinstance(e, GLOBAL_NORMALISERS)
    if isinstance(inner, GLOBAL_NORMALISERS) or row_outer:
        return type(e)(inner.args[0])
    return None


RULES: tuple[Rule, ...] = (
    Rule("exp_log", "exp(log(x)) -> abs(x)", "band: gives EPS where |x| < EPS", _exp_log),
    Rule("log_exp", "log(exp(x)) -> x", "band: x > EXP_MAX or x < log(EPS)", _log_exp),
    Rule("recip_recip", "recip(recip(x)) -> x (div(1, div(1, x)))", "band: |x| < EPS or |x| > 1/EPS",
         _recip_recip),
    Rule("log_recip", "log(recip(x)) -> -log(x)", "band: |x| < EPS or |x| > 1/EPS", _log_recip),
    Rule("cancel", "x*y/x -> y, x/x -> 1, sqr(x)/x -> x: common factors of a quotient cancel",
         "band: where a cancelled denominator is below EPS", _cancel),
    Rule("norm_const", "mms(a) -> 0, zsn(a) -> 0 where a is constant over the normaliser's scope (N; rowsum(W) "
         "inside mms_row)", "exact", _normaliser_of_constant),
    Rule("norm_affine", "mms(c*x + d) -> mms(x), zsn(c*x + d) -> zsn(x) for numbers c > 0, d",
         "exact (up to rounding)", _normaliser_of_affine),
    Rule("norm_norm", "mms(zsn(x)) -> mms(x), zsn(mms(x)) -> zsn(x), mms(mms(x)) -> mms(x), ...",
         "exact (up to rounding)", _normaliser_of_normaliser),
)


def simplify(e: sympy.Expr, counts: Counter | None = None) -> sympy.Expr:
    """Apply the OOS rules bottom-up until none applies; `counts` tallies each rule used."""
    counts = counts if counts is not None else Counter()
    for _ in range(100):  # each rewrite shrinks the tree; the bound only guards against a bad rule
        new = _pass(e, counts)
        if new == e:
            return e
        e = new
    return e


def _pass(e: sympy.Expr, counts: Counter) -> sympy.Expr:
    if e.args and not e.is_Number:
        e = e.func(*[_pass(a, counts) for a in e.args])
    for rule in RULES:
        new = rule.apply(e)
        if new is not None and new != e:
            counts[rule.name] += 1
            return new
    return e
