"""Compile a sympy form into a vectorised torch function of the primitives.

The generated source is one Python expression over `prunerzero.language.ops`, kept on the result
(`CompiledMetric.source`) so a reader can see exactly what runs.
"""
from __future__ import annotations

import functools

import sympy
import torch

from . import ops
from ..errors import DegenerateMetricError, NonFiniteScoreError
from .space import load_space
from .symbolic import LANG_OF, ColSum, RowSum



def _emit(e: sympy.Expr) -> str:
    if isinstance(e, sympy.Symbol):
        return e.name
    if not e.free_symbols and not e.has(RowSum, ColSum):
        try:
            return repr(float(e))  # a closed constant such as sqrt(2): one float
        except TypeError:
            pass  # e.g. zsn(sqrt(2)): sympy cannot evaluate our operators; emit them as code
    if isinstance(e, sympy.Add):
        return "(" + " + ".join(_emit(a) for a in e.args) + ")"
    if isinstance(e, sympy.Mul):
        return "(" + " * ".join(_emit(a) for a in e.args) + ")"
    if isinstance(e, sympy.Pow):
        base, p = e.args
        if p == 2:
            return f"ops.sqr({_emit(base)})"
        if p == sympy.Rational(1, 2):
            return f"ops.sqrt({_emit(base)})"
        if p.is_Integer and p > 0:
            return f"torch.pow({_emit(base)}, {int(p)})"
        return f"torch.pow({_emit(base)}.abs(), {float(p)!r})"  # base is non-negative here
    if isinstance(e, sympy.Abs):
        return f"torch.abs({_emit(e.args[0])})"
    if type(e) in LANG_OF:
        name = LANG_OF[type(e)]
        args = ", ".join(_emit(a) if a.free_symbols else f"torch.as_tensor({_emit(a)})" for a in e.args)
        return f"ops.{name}({args}, shape)" if name in ops.NEEDS_SHAPE else f"ops.{name}({args})"
    raise TypeError(f"cannot compile {sympy.srepr(e)}")


class CompiledMetric:
    """`fn(W, G=None, X=None, **other_primitives) -> scores`, shaped like W, in fp32."""

    def __init__(self, expr: sympy.Expr):
        self.terminals = tuple(sorted(s.name for s in expr.free_symbols))
        self.source = _emit(expr)
        args = ", ".join(self.terminals + ("shape",))
        self._fn = eval(f"lambda {args}: {self.source}", {"ops": ops, "torch": torch})  # noqa: S307

    def __call__(self, W: torch.Tensor, G=None, X=None, dtype=torch.float32, check=False, **extra):
        given = {"W": W, "G": G, "X": X, **extra}
        shape = tuple(W.shape)
        values = {}
        for name in self.terminals:
            v = given.get(name)
            if v is None:
                raise ValueError(f"this metric uses the primitive {name}, which was not given")
            values[name] = _as_operand(name, v, shape, W.device, dtype)
        with torch.no_grad():
            scores = torch.as_tensor(self._fn(**values, shape=shape), device=W.device)
            scores = torch.broadcast_to(scores.to(dtype), shape)
        if check:
            check_scores(scores)
        return scores


def _as_operand(name: str, v, shape, device, dtype) -> torch.Tensor:
    """A primitive as a tensor of its declared shape kind, in `dtype`."""
    kind = load_space().terminals[name].shape
    t = torch.as_tensor(v, device=device).to(dtype)
    if kind == "column":
        t = t.reshape(1, shape[-1])
    elif kind == "row":
        t = t.reshape(shape[0], 1)
    elif kind == "scalar":
        t = t.reshape(())
    elif tuple(t.shape) != shape:
        raise ValueError(f"primitive {name} has shape {tuple(t.shape)}, expected {shape}")
    return t


def check_scores(scores: torch.Tensor, where: str = "") -> None:
    """Raise if scores cannot rank weights: NaN/inf anywhere, or one value for the whole matrix
    or for every row. One pass (each row's min and max, which NaN and inf reach) in the usual
    case: ADMM checks its scores in every iteration that re-chooses the mask."""
    at = f" on {where}" if where else ""
    if scores.numel() == 0:
        return
    if scores.dim() == 0:
        scores = scores.reshape(1, 1)
    low, high = torch.aminmax(scores.reshape(-1, scores.shape[-1]), dim=-1)
    if not bool(torch.isfinite(low).all() and torch.isfinite(high).all()):
        bad = int((~torch.isfinite(scores)).sum())
        raise NonFiniteScoreError(f"metric gives {bad} NaN or infinite scores{at}")
    if scores.numel() > 1 and bool(low.amin() == high.amax()):
        raise DegenerateMetricError(f"metric gives the same score to every weight{at}")
    if scores.shape[-1] > 1 and bool((low == high).all()):
        raise DegenerateMetricError(f"metric gives every weight of a row the same score{at}")


def scorer(name, fn, prims):
    """score(W) -> the compiled metric's checked scores of weights W of layer `name`;
    score.unchecked(W) the same scores without the check, for ADMM's selections on the way to
    its final mask (a pass over the scores in each; the first and the last are checked)."""
    def unchecked(W):
        return fn(W, **prims)

    def score(W):
        scores = unchecked(W)
        check_scores(scores, where=name)
        return scores
    score.unchecked = unchecked
    return score


def layer_primitives(name, uses, stats, n):
    """The primitives a metric uses for one layer: per-layer tensors from `stats`, N a number."""
    return {t: (n if t == "N" else stats[t][name]) for t in uses if t != "W"}


@functools.lru_cache(maxsize=4096)
def compile_cached(text: str) -> CompiledMetric:
    """Compile a simplified form given by its canonical printing (the cache key)."""
    from .text import parse, to_sympy
    return CompiledMetric(to_sympy(parse(text)))


def interpret(node, primitives: dict, dtype=torch.float32) -> torch.Tensor:
    """Evaluate a parsed tree operator by operator, without simplification: the reference
    that compiled metrics are tested against, and what an interpreter would do."""
    W = primitives["W"]

    def ev(n):
        if n.name == "const":
            return torch.tensor(float(n.value), dtype=dtype, device=W.device)
        if not n.args:
            return _as_operand(n.name, primitives[n.name], tuple(W.shape), W.device, dtype)
        if n.name == "pow":
            raise ValueError("interpret() takes trees in function form; ** is not an operator")
        fn = getattr(ops, n.name)
        args = [ev(a) for a in n.args]
        return fn(*args, tuple(W.shape)) if n.name in ops.NEEDS_SHAPE else fn(*args)

    return torch.broadcast_to(ev(node), W.shape)
