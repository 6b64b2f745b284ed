import logging
import os

import pytest
import torch

from helpers import primitives
from tiny import tiny_llama


@pytest.fixture(autouse=True, scope="session")
def _tests_own_cache(tmp_path_factory):
    """The tests write into a cache of their own, never the user's PRUNERZERO_CACHE; the bundled
    model's one-time conversion is borrowed from the user's cache when it is there (read only)."""
    from prunerzero.engine.models import cache_dir
    saved = os.environ.get("PRUNERZERO_CACHE")
    converted = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    root = tmp_path_factory.mktemp("cache")
    if (converted / "config.json").is_file():
        (root / "models").mkdir()
        (root / "models" / converted.name).symlink_to(converted)
    os.environ["PRUNERZERO_CACHE"] = str(root)
    yield root
    if saved is None:
        os.environ.pop("PRUNERZERO_CACHE", None)
    else:
        os.environ["PRUNERZERO_CACHE"] = saved


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


@pytest.fixture
def fp32_blocks(monkeypatch):
    """Blocks of a half-precision model run in fp32, as on a CPU without bf16 units (whatever
    this machine has)."""
    import prunerzero.engine.blocks as blocks

    def upcast(model):
        return torch.float32 if next(model.parameters()).dtype != torch.float32 else None
    monkeypatch.setattr(blocks, "compute_dtype", upcast)


@pytest.fixture(autouse=True)
def _restore_prunerzero_logger():
    """A CLI command run in-process owns the logger as it would own a process (stderr handler,
    no propagation, INFO, maybe quiet); give it back as it was so later tests' caplog still sees records."""
    from prunerzero import progress
    logger = logging.getLogger("prunerzero")
    saved = (list(logger.handlers), logger.propagate, logger.level, progress.quiet())
    yield
    logger.handlers[:], logger.propagate = saved[0], saved[1]
    progress.set_quiet(saved[3])
    logger.setLevel(saved[2])
