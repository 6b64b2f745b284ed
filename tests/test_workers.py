"""Where search workers run (issue 18): local workers spread over the visible GPUs, and a
setup whose primitive files travel as tensors to machines that cannot read this disk."""
import multiprocessing as mp

import torch

from prunerzero.engine.calibration import cache_path, cached, compute_x
from prunerzero.loading import load_model
from prunerzero.runs import pools
from prunerzero.search.evaluator import Evaluator, Setup, Task

from tiny import token_samples


def visible_gpus(monkeypatch, n):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_local_workers_take_distinct_gpus_round_robin(monkeypatch):
    visible_gpus(monkeypatch, 2)
    assert pools.worker_devices("auto", 2) == ["cuda:0", "cuda:1"]
    assert pools.worker_devices("cuda", 3) == ["cuda:0", "cuda:1", "cuda:0"]
    assert pools.worker_devices("cuda:1", 2) == ["cuda:1", "cuda:1"]   # a named device is the user's choice
    assert pools.worker_devices("cpu", 2) == ["cpu", "cpu"]
    visible_gpus(monkeypatch, 1)
    assert pools.worker_devices("auto", 2) == ["auto", "auto"]
    visible_gpus(monkeypatch, 0)
    assert pools.worker_devices("auto", 2) == ["auto", "auto"]


def setup_for(tiny_dir, tmp_path):
    model, _ = load_model(str(tiny_dir), device="cpu", tokenizer=False)
    settings = dict(test="workers", path=str(tmp_path))
    cached("X", settings, lambda: compute_x(model, token_samples(4, 32)))
    return Setup(model=str(tiny_dir), primitives={"X": str(cache_path("X", settings))}, nsamples=4, sparsity=0.5,
                 structure="unstructured", chunks={"search": token_samples(3, 32, seed=2)}, device="cpu")


def test_each_worker_process_takes_the_next_device_of_the_list(tiny_dir, tmp_path):
    """The initializer of each pool process takes its own device from the driver's queue."""
    devices = mp.get_context("spawn").Queue()
    for d in ("cpu", "auto"):
        devices.put(d)
    setup = setup_for(tiny_dir, tmp_path)
    taken = []
    for _ in range(2):
        pools._init(Evaluator, setup, devices)
        taken.append(pools._worker.setup.device)
    assert taken == ["cpu", "auto"]
    pools._init(Evaluator, setup, devices)          # a replacement worker finds the queue empty: the setup's device
    assert pools._worker.setup.device == "cpu"


def test_an_inlined_setup_evaluates_like_one_with_files(tiny_dir, tmp_path):
    setup = setup_for(tiny_dir, tmp_path)
    inline = setup.inline()
    assert all(isinstance(v, dict) for v in inline.primitives.values())
    a, b = Evaluator(setup)(Task("W*X", 0, 3)), Evaluator(inline)(Task("W*X", 0, 3))
    assert a.error is None and (a.fingerprint, a.nll, a.tokens) == (b.fingerprint, b.nll, b.tokens)
