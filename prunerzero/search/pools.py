"""Where candidates are evaluated: in this process, in N local processes, or on Ray actors,
each holding one model copy. `map` returns results in task order, so the search does not
depend on which worker answered."""
from __future__ import annotations

import multiprocessing as mp

from .evaluator import Evaluator, Setup

_worker: Evaluator | None = None


def _gather(results, on_result):
    """Results in task order, reporting each as it arrives."""
    out = []
    for r in results:
        out.append(r)
        if on_result:
            on_result(r)
    return out


class InProcess:
    def __init__(self, setup: Setup, model=None):
        self.evaluator = Evaluator(setup, model)

    def map(self, tasks, on_result=None):
        return _gather(map(self.evaluator, tasks), on_result)

    def close(self):
        pass


def _init(setup):
    global _worker
    _worker = Evaluator(setup)


def _run(task):
    return _worker(task)


class Processes:
    """N spawned processes (spawn: safe with torch threads, same on every OS)."""

    def __init__(self, setup: Setup, workers: int):
        self.pool = mp.get_context("spawn").Pool(workers, initializer=_init, initargs=(setup,))

    def map(self, tasks, on_result=None):
        return _gather(self.pool.imap(_run, tasks, chunksize=1), on_result)

    def close(self):
        self.pool.terminate()
        self.pool.join()


class Ray:
    """One Ray actor per worker (and per GPU when the cluster has them), on an existing
    cluster (`address`) or a local one started here."""

    def __init__(self, setup: Setup, workers: int, address: str | None = None, gpus_per_worker: float = 0):
        try:
            import ray
            from ray.util import ActorPool
        except ImportError:
            raise ImportError("--ray needs Ray: pip install 'prunerzero[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     num_cpus=None if address else max(workers, 1))
        actor = ray.remote(num_cpus=1, num_gpus=gpus_per_worker)(Evaluator)
        ref = ray.put(setup)
        self.actors = [actor.remote(ref) for _ in range(workers)]
        self.pool = ActorPool(self.actors)

    def map(self, tasks, on_result=None):
        return _gather(self.pool.map(lambda a, t: a.evaluate.remote(t), tasks), on_result)

    def close(self):
        for a in self.actors:
            self.ray.kill(a)


def make_pool(setup: Setup, workers: int = 1, ray: bool = False, ray_address: str | None = None,
              gpus_per_worker: float = 0, model=None):
    if ray:
        return Ray(setup, workers, ray_address, gpus_per_worker)
    if workers > 1:
        return Processes(setup, workers)
    return InProcess(setup, model)
