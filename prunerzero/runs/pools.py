"""Where candidates are evaluated: in this process, in N local processes, or on Ray actors,
each holding one model copy. `map` returns results in task order, so the search does not
depend on which worker answered. The worker is a class built from a picklable setup (with a
`device` field and an `inline()` for remote nodes), called on each task and exposing the same
call as `evaluate` for Ray: the metric search's Evaluator, darwin's Scorer. Nothing here knows
either search: the caller names the worker class."""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import queue

import torch

from ..progress import set_quiet

_worker = None  # this worker process's evaluator (see _init)


def worker_devices(device: str, workers: int) -> list[str]:
    """The device of each local worker: with several CUDA devices visible and `device` "auto" or
    "cuda", round robin over them (worker i on cuda:i mod count); otherwise `device` for all."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device in ("auto", "cuda") and count > 1:
        return [f"cuda:{i % count}" for i in range(workers)]
    return [device] * workers


def _gather(results, on_result):
    """Results in task order, reporting each as it arrives."""
    out = []
    for r in results:
        out.append(r)
        if on_result:
            on_result(r)
    return out


class InProcess:
    def __init__(self, setup, model=None, *, worker):
        self.evaluator = worker(setup, model)

    def map(self, tasks, on_result=None):
        return _gather(map(self.evaluator, tasks), on_result)

    def close(self):
        pass


def _init(worker, setup, devices):
    """A worker process's evaluator, on the next device of the driver's list (`devices`: a
    queue holding one device per worker process)."""
    global _worker
    set_quiet(True)   # a worker's bars would interleave with the driver's lines; its results say what it did
    try:
        setup = dataclasses.replace(setup, device=devices.get(timeout=5))
    except queue.Empty:  # a replacement for a worker that died: any device of the setup's kind
        pass
    _worker = worker(setup)


def _run(task):
    return _worker(task)


class Processes:
    """N spawned processes (spawn: safe with torch threads, same on every OS), spread over the
    visible GPUs (see worker_devices)."""

    def __init__(self, setup, workers: int, worker):
        ctx = mp.get_context("spawn")
        self.devices = worker_devices(setup.device, workers)
        devices = ctx.Queue()
        for d in self.devices:
            devices.put(d)
        self.pool = ctx.Pool(workers, initializer=_init, initargs=(worker, setup, devices))

    def map(self, tasks, on_result=None):
        return _gather(self.pool.imap(_run, tasks, chunksize=1), on_result)

    def close(self):
        self.pool.terminate()
        self.pool.join()


class Ray:
    """One Ray actor per worker, on an existing cluster (`address`) or a local one started here.
    Each actor asks for `gpus_per_worker` GPUs (None: one when the cluster has GPUs; Ray hides
    the GPUs from an actor that asks for none). On an existing cluster, whose nodes may not
    share this machine's disk, the setup's files (primitives, a darwin database) travel in
    Ray's object store."""

    def __init__(self, setup, workers: int, address: str | None = None, gpus_per_worker: float | None = None, *,
                 worker):
        try:
            import ray
            from ray.util import ActorPool
        except ImportError:
            raise ImportError("--ray needs Ray: pip install 'prunerzero[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     num_cpus=None if address else max(workers, 1))
        if gpus_per_worker is None:
            gpus_per_worker = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        self.gpus_per_worker = gpus_per_worker
        actor = ray.remote(num_cpus=1, num_gpus=gpus_per_worker)(worker)
        ref = ray.put(setup.inline() if address else setup)
        self.actors = [actor.remote(ref) for _ in range(workers)]
        self.pool = ActorPool(self.actors)

    def map(self, tasks, on_result=None):
        return _gather(self.pool.map(lambda a, t: a.evaluate.remote(t), tasks), on_result)

    def close(self):
        for a in self.actors:
            self.ray.kill(a)


def make_pool(setup, workers: int = 1, ray: bool = False, ray_address: str | None = None,
              gpus_per_worker: float | None = None, model=None, *, worker):
    if ray:
        return Ray(setup, workers, ray_address, gpus_per_worker, worker=worker)
    if workers > 1:
        return Processes(setup, workers, worker)
    return InProcess(setup, model, worker=worker)
