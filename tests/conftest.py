import pytest

from helpers import primitives
from tiny import tiny_llama


@pytest.fixture
def prims():
    return primitives()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama saved to a folder, once per test module."""
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A primitive cache of this test's own (modules opt in with usefixtures)."""
    monkeypatch.setenv("PRUNERZERO_CACHE", str(tmp_path / "cache"))
