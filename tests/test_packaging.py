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
