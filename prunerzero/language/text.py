"""Text of the metric language: parse a string to a tree, print trees and sympy forms.

Grammar: Python expression syntax restricted to terminal names (W, G, X, ...), numbers,
operator calls `op(a, b)`, infix `+ - * / **` and unary minus. `**` takes a number as
exponent. Parsing uses Python's own `ast`, so errors point at exact columns.
"""
from __future__ import annotations

import ast
import difflib
import sys
from dataclasses import dataclass
from fractions import Fraction

import sympy

from ..errors import MetricSyntaxError
from .space import load_space
from .symbolic import LANG_OF, apply_operator, power, symbols

_BINOPS = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "div"}

# Limits that keep every accepted metric compilable and every refusal a clear message:
# numbers a float64 holds (compiled constants are floats; printed forms of protected
# divisions carry exact rationals near 1e30, so the bound is float64's, not float32's),
# exponents whose powers sympy and torch handle exactly, and trees well beyond any search's
# (height 6 by default) but short of Python's recursion limit.
MAX_NUMBER = sys.float_info.max
MAX_EXPONENT = 64
MAX_TEXT, MAX_DEPTH, MAX_NODES = 10_000, 100, 2_000
_TOO_DEEP = f"metric is nested more than {MAX_DEPTH} levels deep (a long sum nests one level per term)"


@dataclass(frozen=True)
class Node:
    """A parsed metric tree: an operator with children, a terminal, or a constant."""

    name: str                     # operator or terminal name; "const" for numbers
    args: tuple["Node", ...] = ()
    value: Fraction | None = None

    def __str__(self) -> str:  # function form, as DEAP prints its trees
        if self.name == "const":
            return _number_text(self.value)
        if not self.args:
            return self.name
        return f"{self.name}({', '.join(str(a) for a in self.args)})"


def parse(text: str) -> Node:
    """Parse `text` into a Node tree, or raise MetricSyntaxError pointing at the problem."""
    if not isinstance(text, str) or not text.strip():
        raise MetricSyntaxError("empty metric: give an expression such as 'abs(W) * X' or a catalog name")
    src = text.strip()
    if len(src) > MAX_TEXT:
        raise MetricSyntaxError(f"metric is too long: {len(src)} characters, at most {MAX_TEXT}")
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as e:
        col = max((e.offset or 1) - 1, 0)
        opens, closes = src.count("("), src.count(")")
        if "too many nested" in str(e.msg):
            raise MetricSyntaxError(_TOO_DEEP) from None
        why = "unbalanced parentheses" if opens != closes else "invalid syntax"
        raise MetricSyntaxError(f"{why} in metric", src, min(col, len(src))) from None
    except (RecursionError, MemoryError):
        raise MetricSyntaxError(_TOO_DEEP) from None
    _check_size(tree.body)
    return _Builder(src).build(tree.body)


def _brief(x) -> str:
    """A number short enough for a one-line message."""
    try:
        f = float(x)
    except (OverflowError, TypeError):
        f = float("inf")
    return f"{f:.6g}" if abs(f) != float("inf") else "a number beyond 1.8e308"


def _clip(text: str, n: int = 30) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _check_size(root: ast.AST) -> None:
    """Refuse trees too deep or too large to simplify, walking without recursion."""
    stack, nodes = [(root, 1)], 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if depth > MAX_DEPTH:
            raise MetricSyntaxError(_TOO_DEEP)
        if nodes > MAX_NODES:
            raise MetricSyntaxError(f"metric has more than {MAX_NODES} parts; write it more compactly")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node)
                     if not isinstance(child, (ast.operator, ast.unaryop, ast.expr_context)))


class _Builder:
    def __init__(self, src: str):
        self.src = src
        space = load_space()
        self.terminals, self.operators = space.terminals, space.operators
        self.catalog = space.catalog

    def fail(self, msg: str, node: ast.AST) -> MetricSyntaxError:
        return MetricSyntaxError(msg, self.src, getattr(node, "col_offset", None))

    def build(self, n: ast.AST) -> Node:
        if isinstance(n, ast.BinOp):
            if isinstance(n.op, ast.Pow):
                return Node("pow", (self.build(n.left), self.build(n.right)))
            if type(n.op) not in _BINOPS:
                raise self.fail(f"operator {type(n.op).__name__} is not part of the metric language", n)
            return Node(_BINOPS[type(n.op)], (self.build(n.left), self.build(n.right)))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            inner = self.build(n.operand)
            if isinstance(n.op, ast.UAdd):
                return inner
            if inner.name == "const":
                return Node("const", value=-inner.value)
            return Node("neg", (inner,))
        if isinstance(n, ast.Constant) and type(n.value) in (int, float):
            return Node("const", value=self.number(n))
        if isinstance(n, ast.Constant):
            literal = ast.get_source_segment(self.src, n) or repr(n.value)
            raise self.fail(f"only real numbers can appear in a metric, got {literal}", n)
        if isinstance(n, ast.Name):
            if n.id in self.terminals:
                return Node(n.id)
            if n.id in self.operators:
                raise self.fail(f"'{n.id}' is an operator: call it, e.g. {n.id}(W)", n)
            raise self.fail(self.unknown(n.id, "terminal"), n)
        if isinstance(n, ast.Call):
            return self.call(n)
        raise self.fail(f"unsupported syntax ({type(n).__name__}) in metric", n)

    def number(self, n: ast.Constant) -> Fraction:
        """The exact value of a literal (decimal text read exactly, not via float; hex, octal
        and binary integers as Python reads them), within the range a float32 score carries."""
        literal = ast.get_source_segment(self.src, n) or repr(n.value)
        value = Fraction(n.value) if isinstance(n.value, int) else Fraction(literal.replace("_", ""))
        if abs(value) > MAX_NUMBER or (value and n.value == 0):
            raise self.fail(f"number {_clip(literal)} is out of range: a metric's numbers must be finite "
                            f"and nonzero ones must lie between {sys.float_info.min:g} and {MAX_NUMBER:g} in size", n)
        return value

    def call(self, n: ast.Call) -> Node:
        if not isinstance(n.func, ast.Name):
            raise self.fail("only plain operator names can be called", n)
        name = n.func.id
        if name not in self.operators:
            raise self.fail(self.unknown(name, "operator"), n)
        if n.keywords:
            raise self.fail(f"{name}() takes no keyword arguments", n)
        arity = self.operators[name].arity
        if len(n.args) != arity:
            raise self.fail(f"{name}() takes {arity} argument{'s' * (arity != 1)}, got {len(n.args)}", n)
        return Node(name, tuple(self.build(a) for a in n.args))

    def unknown(self, name: str, kind: str) -> str:
        known = [*self.terminals, *self.operators]
        lower = {k.lower(): k for k in known}
        close = difflib.get_close_matches(name, known, n=1) or [
            lower[m] for m in difflib.get_close_matches(name.lower(), list(lower), n=1)]
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return (f"unknown {kind} '{name}'{hint} (terminals: {', '.join(self.terminals)}; "
                f"operators: {', '.join(self.operators)}; `prunerzero metrics` lists named metrics)")


def to_sympy(node: Node) -> sympy.Expr:
    """The sympy form of a parsed tree (sympy's exact arithmetic rules already applied)."""
    e = normalise(_to_sympy(node, symbols()))
    for number in e.atoms(sympy.Number):
        if not number.is_finite or abs(number) > MAX_NUMBER:
            raise MetricSyntaxError(f"the metric's constants combine to {_brief(number)}, beyond what a float holds")
    return e


def normalise(e: sympy.Expr) -> sympy.Expr:
    """Rebuild bottom-up so every node is evaluated: sympy leaves some built by its own
    rewrites unevaluated (abs(abs(W)) after splitting a power, -(a - b) from a sign pull)."""
    for _ in range(10):
        new = _rebuild(e)
        if new == e:
            return e
        e = new
    return e


def _rebuild(e: sympy.Expr) -> sympy.Expr:
    if not e.args or e.is_Number:
        return e
    return e.func(*[_rebuild(a) for a in e.args])


def _to_sympy(node: Node, syms) -> sympy.Expr:
    if node.name == "const":
        return sympy.Rational(node.value.numerator, node.value.denominator)
    if not node.args:
        return syms[node.name]
    args = [_to_sympy(a, syms) for a in node.args]
    if node.name == "pow":
        p = args[1]
        if not p.is_Number:
            raise MetricSyntaxError(f"the exponent of ** must be a number, got '{node.args[1]}'")
        if not p.is_finite or abs(p) > MAX_EXPONENT:
            raise MetricSyntaxError(f"the exponent of ** must lie in [-{MAX_EXPONENT}, {MAX_EXPONENT}], "
                                    f"got {_brief(p)}")
        return power(args[0], p)
    e = apply_operator(node.name, args)
    if e.is_Number and not e.is_finite:
        raise MetricSyntaxError(f"{node} is not a finite number")
    return e


# ---------------------------------------------------------------- printing sympy forms

_PREC_ADD, _PREC_MUL, _PREC_POW, _PREC_ATOM = 1, 2, 3, 4


def _number_text(v) -> str:
    """Exact text of a rational: its finite decimal when there is one, else p/q."""
    f = Fraction(v)
    if f.denominator == 1:
        return str(f.numerator)
    twos = fives = 0
    d = f.denominator
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return f"{f.numerator}/{f.denominator}"
    places = max(twos, fives)
    digits = str(abs(f.numerator) * 10**places // f.denominator).rjust(places + 1, "0")
    sign = "-" if f < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def to_text(e: sympy.Expr) -> str:
    """Print a sympy form in the metric language; the text parses back to the same form."""
    return _print(e)[0]


def _print(e: sympy.Expr) -> tuple[str, int]:
    if isinstance(e, sympy.Symbol):
        return e.name, _PREC_ATOM
    if e.is_Rational:
        text = _number_text(Fraction(int(e.p), int(e.q)))
        prec = _PREC_ADD if e < 0 else _PREC_MUL if "/" in text else _PREC_ATOM
        return text, prec
    if e.is_Float:
        return repr(float(e)), (_PREC_ATOM if e >= 0 else _PREC_ADD)
    if isinstance(e, sympy.Add):
        return _print_add(e), _PREC_ADD
    if isinstance(e, sympy.Mul):
        return _print_mul(e)
    if isinstance(e, sympy.Pow):
        return _print_pow(e)
    if isinstance(e, sympy.Abs):
        return f"abs({to_text(e.args[0])})", _PREC_ATOM
    if type(e) in LANG_OF:
        return f"{LANG_OF[type(e)]}({', '.join(to_text(a) for a in e.args)})", _PREC_ATOM
    if e.is_Number or isinstance(e, sympy.NumberSymbol):
        return repr(float(e)), _PREC_ATOM
    raise TypeError(f"cannot print {sympy.srepr(e)} in the metric language")


def _ordered(items) -> list:
    """Terms or factors in a fixed order that reads well: those with W first, then by text."""
    w = symbols()["W"]
    return sorted(items, key=lambda t: (w not in t.free_symbols, t.is_Number is False, _print(t)[0]))


def _wrap(e: sympy.Expr, min_prec: int) -> str:
    text, prec = _print(e)
    return f"({text})" if prec < min_prec else text


def _print_add(e: sympy.Add) -> str:
    out = ""
    for i, term in enumerate(_ordered(sympy.Add.make_args(e))):
        coeff, rest = term.as_coeff_Mul()
        if coeff.is_negative and i > 0:
            out += " - " + _wrap(-term, _PREC_MUL)
        else:
            out += (" + " if i > 0 else "") + _wrap(term, _PREC_ADD + 1 if i > 0 else _PREC_ADD)
    return out


def _print_mul(e: sympy.Mul) -> tuple[str, int]:
    from .symbolic import Recip
    coeff, rest = e.as_coeff_Mul()
    sign, coeff = ("-", -coeff) if coeff.is_negative else ("", coeff)
    num, den = [], []
    for f in _ordered(sympy.Mul.make_args(rest)):
        (den if isinstance(f, Recip) else num).append(f)
    text = "*".join(_wrap(f, _PREC_MUL) for f in num)
    if not text:
        text, coeff = _wrap(coeff, _PREC_MUL), sympy.Integer(1)
    for d in den:  # a/b/c = a * recip(b) * recip(c): each denominator on its own
        text += "/" + _wrap(d.args[0], _PREC_POW)
    if (sign or coeff != 1) and isinstance(num[0] if num else None, sympy.Add) and (len(num) > 1 or den):
        text = f"({text})"  # sympy distributes a number over a lone sum: -(a + b)*c -> (-a - b)*c
    if coeff != 1:
        text = f"{_wrap(coeff, _PREC_MUL)}*{text}"
    return sign + text, (_PREC_ADD if sign else _PREC_MUL)


def _print_pow(e: sympy.Pow) -> tuple[str, int]:
    base, p = e.args
    if p == 2:
        return f"sqr({to_text(base)})", _PREC_ATOM
    if p == sympy.Rational(1, 2) and base.is_nonnegative:
        return f"sqrt({to_text(base)})", _PREC_ATOM
    if p.is_Number and p > 0:
        return f"{_wrap(base, _PREC_ATOM)}**{_wrap(p, _PREC_ATOM)}", _PREC_POW
    raise TypeError(f"cannot print {e}: negative powers are written with div")
