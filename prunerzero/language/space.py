"""The search space and the metric catalog, read from the `primitives/` TOML files.

Source checkouts read the top-level `primitives/` folder; wheels carry a copy inside
the package (see pyproject.toml). `PRUNERZERO_PRIMITIVES` points at another folder.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SHAPES = ("matrix", "column", "row", "scalar")
SIGNS = ("real", "nonnegative", "positive")


def primitives_dir() -> Path:
    env = os.environ.get("PRUNERZERO_PRIMITIVES")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]  # prunerzero/: a wheel carries primitives/ inside it
    for cand in (package / "primitives", package.parent / "primitives"):  # else the source tree's
        if (cand / "search_space.toml").is_file():
            return cand
    raise FileNotFoundError("prunerzero's primitives/ folder is missing; reinstall the package")


@dataclass(frozen=True)
class Terminal:
    name: str
    shape: str
    sign: str
    doc: str

    @property
    def varies_along_row(self) -> bool:
        """Whether values differ between the input columns of one output row."""
        return self.shape in ("matrix", "column")


@dataclass(frozen=True)
class Operator:
    name: str
    arity: int
    doc: str
    infix: str | None = None


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    expr: str
    source: str
    doc: str
    figures: dict
    group: str = "row"  # the comparison group the metric was published with (masks.GROUPS)
    update: str = "none"        # a recipe: the reconstruction `apply` runs after its mask by default
    allocation: str = "uniform"  # and its per-layer sparsity


@dataclass(frozen=True)
class SearchSpace:
    terminals: dict[str, Terminal]
    operators: dict[str, Operator]
    search: dict
    catalog: dict[str, CatalogEntry]


def _read(path: Path) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


@functools.lru_cache(maxsize=4)
def load_space(folder: str | None = None) -> SearchSpace:
    root = Path(folder) if folder else primitives_dir()
    raw = _read(root / "search_space.toml")
    terminals = {}
    for name, t in raw["terminals"].items():
        if t["shape"] not in SHAPES or t["sign"] not in SIGNS:
            raise ValueError(f"terminal {name}: shape must be one of {SHAPES}, sign one of {SIGNS}")
        terminals[name] = Terminal(name, t["shape"], t["sign"], t.get("doc", ""))
    operators = {n: Operator(n, int(o["arity"]), o.get("doc", ""), o.get("infix"))
                 for n, o in raw["operators"].items()}
    catalog = {n: CatalogEntry(n, c["expr"], c.get("source", ""), c.get("doc", ""), c.get("figures", {}),
                               c.get("group", "row"), c.get("update", "none"), c.get("allocation", "uniform"))
               for n, c in _read(root / "catalog.toml").items()}
    return SearchSpace(terminals, operators, raw.get("search", {}), catalog)


def recipe_defaults(metric, update, allocation) -> tuple:
    """The update and allocation to prune with: those given (not None), else the catalogued
    recipe's when `metric` is a catalog name, else none and uniform."""
    entry = load_space().catalog.get(metric) if isinstance(metric, str) else None
    return (update if update is not None else entry.update if entry else "none",
            allocation if allocation is not None else entry.allocation if entry else "uniform")
