"""The search space must be available after a plain (non-editable) install."""
import subprocess
import sys
import zipfile

import pytest


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
    code = ("import prunerzero, prunerzero.space as s; print(s.primitives_dir()); "
            "print(prunerzero.Metric.parse('pruner-zero').canonical())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site)},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith(str(site))
    assert out[1] == "sqr(W)*mms(G)"


def test_the_readme_lists_every_catalog_entry():
    """The README's catalog line names every entry of primitives/catalog.toml (it went stale once)."""
    import re
    from pathlib import Path
    from prunerzero.space import load_space
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = readme[readme.index("- **Catalog**"):].split("\n- ")[0]
    assert set(load_space().catalog) <= set(re.findall(r"`([a-z0-9-]+)`", line))
