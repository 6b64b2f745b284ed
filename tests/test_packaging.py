"""Packaging: the search space is there after a plain (non-editable) install, the README's lists
match the code, and the package's imports point one way."""
import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import prunerzero


def test_wheel_carries_the_primitives_and_reads_them(tmp_path):
    pytest.importorskip("hatchling")
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(root)], check=True)
    wheel = next(tmp_path.glob("prunerzero-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "prunerzero/primitives/search_space.toml" in names
    assert "prunerzero/primitives/catalog.toml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import prunerzero, prunerzero.language.space as s; print(s.primitives_dir()); "
            "print(prunerzero.Metric.parse('pruner-zero').canonical())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site)},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith(str(site))
    assert out[1] == "sqr(W)*mms(G)"


def test_the_docs_list_every_catalog_entry():
    """The metric-language page's catalog line names every entry of primitives/catalog.toml (it went
    stale once)."""
    import re
    from pathlib import Path
    from prunerzero.language.space import load_space
    readme = (Path(__file__).resolve().parents[1] / "docs" / "metric-language.md").read_text()
    line = readme[readme.index("- **Catalog**"):].split("\n- ")[0]
    assert set(load_space().catalog) <= set(re.findall(r"`([a-z0-9-]+)`", line))


def _imports(root: Path) -> dict:
    """module -> the prunerzero modules it imports anywhere in its body (lazy imports too)."""
    mods = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in root.rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - max(node.level - 1, 0)] if node.level else []
                target = ".".join(base + [node.module]) if node.module else ".".join(base)
                # `from . import ops` imports the module ops, not the package
                deps |= {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods}
                if node.module and target in mods:
                    deps.add(target)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
        graph[name] = deps - {name}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = _imports(Path(prunerzero.__file__).parent)
    assert "prunerzero.engine.models" in graph["prunerzero.loading"]  # the walk sees real imports
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"
    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_the_layers_import_one_way():
    """language <- engine <- runs <- search, structured <- the commands: the engine never calls
    into a search (an allocation search is resolved above it, recipes.py), and the run
    infrastructure knows no search."""
    graph = _imports(Path(prunerzero.__file__).parent)
    above = {"engine": ("search", "structured", "runs", "pipeline", "recipes", "cli", "loading"),
             "language": ("engine", "search", "structured", "runs", "pipeline"),
             "runs": ("search", "structured", "pipeline", "recipes", "cli")}
    wrong = [(m, d) for m, deps in graph.items() for part, banned in above.items()
             if m.startswith(f"prunerzero.{part}") for d in deps
             if any(d == f"prunerzero.{b}" or d.startswith(f"prunerzero.{b}.") for b in banned)]
    assert not wrong, wrong


def test_the_readme_install_line_is_the_one_ci_runs():
    """CI resolves what a new user gets only if it installs as the README says."""
    root = Path(__file__).resolve().parents[1]
    readme, ci = (root / "README.md").read_text(), (root / ".ci" / "run").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("python3 -m venv .venv"))
    install = line.split(" && prunerzero ")[0]
    assert install in ci and "pytest -q" in ci


def test_the_readme_is_a_guide_and_its_links_resolve():
    import re
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    assert len(readme.splitlines()) < 300
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert len(set(links)) >= 8 and all((root / link).is_file() for link in links)
    assert "issue" not in readme.lower()


def test_the_tests_write_into_a_cache_of_their_own(tmp_path_factory):
    from prunerzero.engine.models import cache_dir
    assert str(cache_dir()).startswith(str(tmp_path_factory.getbasetemp()))
