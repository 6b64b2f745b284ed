"""`Metric`: a pruning metric of the language, from text or a catalog name to torch.

    >>> m = Metric.parse("exp(log(sqrt(sqr(W)))) * X")
    >>> str(m.simplify()), m.canonical()
    ('abs(W)*X', 'abs(W)*X')
    >>> scores = m.compile()(W, X=x_norm)
"""
from __future__ import annotations

from collections import Counter
from functools import cached_property

import sympy

from . import canonical as _canonical
from . import oos
from .compile import CompiledMetric, compile_cached
from ..errors import DegenerateMetricError
from .text import Node, parse, to_sympy, to_text
from .space import load_space
from .symbolic import varies_along_row


class Metric:
    """An immutable metric: its source text, parsed tree and sympy form."""

    def __init__(self, expr: sympy.Expr, text: str | None = None, name: str | None = None,
                 tree: Node | None = None, rules: Counter | None = None):
        self.expr = expr
        self.text = text if text is not None else to_text(expr)
        self.name = name
        self.tree = tree
        self.rules = rules or Counter()  # OOS rules applied to reach this form

    @classmethod
    def parse(cls, text: str) -> "Metric":
        """Parse metric text or a catalog name (`wanda`, `pruner-zero`, ...)."""
        if isinstance(text, Metric):
            return text
        name = None
        catalog = load_space().catalog
        key = text.strip() if isinstance(text, str) else text
        if isinstance(key, str) and key in catalog:
            name, text = key, catalog[key].expr
        tree = parse(text)
        metric = cls(to_sympy(tree), text=text.strip(), name=name, tree=tree)
        metric.validate()
        return metric

    def validate(self) -> None:
        """Raise DegenerateMetricError for metrics that cannot rank a row's weights."""
        s = self.simplify().expr
        if not s.free_symbols:
            raise DegenerateMetricError(f"metric '{self.text}' is constant ({to_text(s)}): it cannot rank weights")
        if "W" not in {x.name for x in s.free_symbols}:
            raise DegenerateMetricError(
                f"metric '{self.text}' does not depend on W (it simplifies to {to_text(s)})")
        if not varies_along_row(s):
            raise DegenerateMetricError(
                f"metric '{self.text}' is constant along each output row ({to_text(s)}): "
                "every weight of a row would tie")

    def simplify(self) -> "Metric":
        """The OOS-simplified metric; `.rules` counts the rules that fired."""
        return self._simplified

    @cached_property
    def _simplified(self) -> "Metric":
        counts = Counter()
        s = oos.simplify(self.expr, counts)
        return Metric(s, name=self.name, rules=counts)

    def canonical(self) -> str:
        """Rank-equivalence key: metrics with equal keys give the same per-row masks."""
        return self._canonical

    @cached_property
    def _canonical(self) -> str:
        return to_text(_canonical.rank_core(self.simplify().expr))

    def compile(self) -> CompiledMetric:
        """Vectorised torch scorer of the simplified form (cached per simplified form)."""
        return compile_cached(str(self.simplify()))

    @property
    def group(self) -> str:
        """Comparison group of unstructured masks: the catalog's for named metrics, else per row."""
        return load_space().catalog[self.name].group if self.name else "row"

    @property
    def terminals(self) -> frozenset[str]:
        return frozenset(s.name for s in self.simplify().expr.free_symbols)

    def __str__(self) -> str:
        return to_text(self.expr)

    def __repr__(self) -> str:
        label = f"{self.name}: " if self.name else ""
        return f"Metric({label}{self})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Metric) and self.expr == other.expr

    def __hash__(self) -> int:
        return hash(self.expr)


def catalog() -> dict[str, Metric]:
    """Every named metric of `primitives/catalog.toml`."""
    return {name: Metric.parse(name) for name in load_space().catalog}
