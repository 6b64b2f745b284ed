"""sympy forms of the metric language.

Plain arithmetic (add, sub, mul, neg, sqr, abs, sqrt = |a|**(1/2)) uses sympy's own Add,
Mul, Pow and Abs: their automatic rules (x - x = 0, x * 1 = x, sqrt(x**2) = |x|, ...) are
exact for real numbers. Every operator whose protected definition sympy does not know is a
custom Function below, so sympy never rewrites it with another meaning; a Function of plain
numbers folds to the number that `prunerzero.language.ops` computes, so there is one definition.
"""
from __future__ import annotations

import math

import sympy
import torch

from . import ops
from .space import load_space


class Op(sympy.Function):
    """An operator of the metric language that sympy must treat as opaque."""

    is_real = True
    lang = ""          # its name in the metric language
    foldable = True    # whether f(number) may be folded to a number

    @classmethod
    def eval(cls, *args):
        if cls.foldable and all(a.is_Number for a in args):
            value = getattr(ops, cls.lang)(*[torch.tensor(float(a), dtype=torch.float64) for a in args])
            return to_number(float(value))
        return None


def to_number(v: float) -> sympy.Expr:
    """A folded value as the exact rational of its shortest decimal, so printing round-trips."""
    if not math.isfinite(v):
        return sympy.Float(v)
    return sympy.Rational(repr(v))


class Recip(Op):
    lang = "recip"
    is_zero = False

    @classmethod
    def eval(cls, b):
        if b.is_Rational and abs(b) >= sympy.Rational(ops.EPS):
            return 1 / b  # exact
        return super().eval(b)

    def _eval_is_positive(self):
        a = self.args[0]
        if a.is_nonnegative:
            return True  # recip(0) = +1/EPS
        return False if a.is_negative else None

    def _eval_is_negative(self):
        return self.args[0].is_negative


class Exp(Op):
    lang = "exp"
    is_positive = True


class Log(Op):
    lang = "log"


class Tanh(Op):
    lang = "tanh"

    def _eval_is_nonnegative(self):
        return self.args[0].is_nonnegative

    def _eval_is_positive(self):
        return self.args[0].is_positive


class Sigmoid(Op):
    lang = "sigmoid"
    is_positive = True


class MMS(Op):
    lang = "mms"
    is_nonnegative = True


class ZSN(Op):
    lang = "zsn"


class MMSRow(Op):
    lang = "mms_row"
    is_nonnegative = True


class ZSNRow(Op):
    lang = "zsn_row"


class _Sum(Op):
    foldable = False   # the result depends on the layer's shape

    def _eval_is_nonnegative(self):
        return self.args[0].is_nonnegative

    def _eval_is_positive(self):
        return self.args[0].is_positive


class RowSum(_Sum):
    lang = "rowsum"


class ColSum(_Sum):
    lang = "colsum"


FUNCTIONS: dict[str, type[Op]] = {
    cls.lang: cls for cls in (Recip, Exp, Log, Tanh, Sigmoid, MMS, ZSN, MMSRow, ZSNRow, RowSum, ColSum)
}
LANG_OF: dict[type[Op], str] = {cls: name for name, cls in FUNCTIONS.items()}
NORMALISERS = (MMS, ZSN, MMSRow, ZSNRow)     # positive-affine maps of their argument
GLOBAL_NORMALISERS = (MMS, ZSN)              # ... with one affine map for the whole matrix


def symbols() -> dict[str, sympy.Symbol]:
    """The sympy Symbol of every terminal, with what is known of its sign."""
    out = {}
    for t in load_space().terminals.values():
        kw = {"real": {"real": True}, "nonnegative": {"nonnegative": True},
              "positive": {"positive": True}}[t.sign]
        out[t.name] = sympy.Symbol(t.name, **kw)
    return out


def power(base: sympy.Expr, p: sympy.Expr) -> sympy.Expr:
    """`base ** p` for a numeric p: integer powers as written, other powers of |base|."""
    if not p.is_Number:
        raise TypeError("exponent must be a number")
    if p == 0:
        return sympy.Integer(1)
    b = base if p.is_integer else sympy.Abs(base)
    return b**p if p > 0 else Recip(b**(-p))


def apply_operator(name: str, args: list[sympy.Expr]) -> sympy.Expr:
    """Build the sympy form of operator `name` applied to `args`."""
    a = args[0]
    if name == "add":
        return a + args[1]
    if name == "sub":
        return a - args[1]
    if name == "mul":
        return a * args[1]
    if name == "div":
        return a * Recip(args[1])
    if name == "neg":
        return -a
    if name == "abs":
        return sympy.Abs(a)
    if name == "sqr":
        return a**2
    if name == "sqrt":
        return sympy.sqrt(sympy.Abs(a))
    if name in FUNCTIONS:
        return FUNCTIONS[name](a)
    raise KeyError(name)


def varies_along_row(e: sympy.Expr) -> bool:
    """Whether `e` can differ between the input columns of one output row."""
    if isinstance(e, sympy.Symbol):
        return load_space().terminals[e.name].varies_along_row
    if isinstance(e, RowSum):
        return False
    return any(varies_along_row(a) for a in e.args)


_AXES = {"matrix": frozenset("oi"), "column": frozenset("i"), "row": frozenset("o"), "scalar": frozenset()}


def axes(e: sympy.Expr) -> frozenset:
    """The axes `e` can vary along: "o" (between output rows), "i" (between input columns).
    A normaliser of something that does not vary over its scope is constant (0, see ops)."""
    if isinstance(e, sympy.Symbol):
        return _AXES[load_space().terminals[e.name].shape]
    if not e.args:
        return frozenset()
    inner = frozenset().union(*(axes(a) for a in e.args))
    if isinstance(e, RowSum):
        return inner - {"i"}
    if isinstance(e, ColSum):
        return inner - {"o"}
    if isinstance(e, NORMALISERS) and not _varies_within(e, inner):
        return frozenset()
    return inner


def varies_over_scope(e: sympy.Expr) -> bool:
    """Whether normaliser `e`'s argument varies where it normalises: anywhere in the matrix for
    mms and zsn, along each row for the row variants."""
    return _varies_within(e, axes(e.args[0]))


def _varies_within(e: sympy.Expr, inner: frozenset) -> bool:
    """Normaliser `e` over an argument varying along `inner`: is it anything but constant?"""
    return bool(inner) if isinstance(e, GLOBAL_NORMALISERS) else "i" in inner

