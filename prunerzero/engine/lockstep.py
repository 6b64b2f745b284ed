"""Forward passes run in lockstep: each batch of calibration samples in a coroutine of its own
(a greenlet), all of them stopping at the same points of the forward until the last arrives. A
staged block is then pruned in one pass of its pruned stream: every batch halts before a stage's
layers, the stage is pruned from what they all brought, and every batch goes on through the
pruned layers (stages.staged_block). A pass per stage is what it replaces.

Coroutines rather than one big batch: a 512-token sample already runs a CPU's matrix units at
full speed, and a call of 16 samples measured slower per sample (see passes.samples_per_call),
so each keeps its own batch size. Coroutines rather than threads: they all run on the caller's
thread, so its math library keeps one pool of worker threads (with a thread per batch, every
handover woke another pool, and the pass measured 1.6x slower per batch on a 2-core CPU), the
order is fixed (batch 0, 1, ... at every stop) and torch's per-thread state (grad mode) is the
caller's."""
from __future__ import annotations

from typing import Callable, Iterable

from greenlet import GreenletExit, getcurrent, greenlet


class Lockstep:
    """run(work, units, stops): work(unit, sync) in a coroutine per unit; sync(k) inside hands
    back to run, which goes on once every unit has reached stop k: it runs at_stop(k), then
    resumes them in order. Every unit must call sync for stops 0, 1, ... stops - 1, in that order,
    and then end. The first exception of any unit (or of at_stop) is raised by run; the other
    units are unwound where they stopped."""

    def __init__(self, at_stop: Callable[[int], None]):
        self.at_stop = at_stop
        self.current = None     # the index of the unit running now
        self._hub = None

    def sync(self, k: int) -> None:
        """Called inside a unit's work at stop k."""
        self._hub.switch(("stop", k))

    def run(self, work: Callable, units: Iterable, stops: int) -> None:
        self._hub = getcurrent()
        lets = [greenlet(lambda u=u: work(u, self.sync)) for u in units]
        try:
            for k in range(stops + 1):
                for j, g in enumerate(lets):
                    self.current = j
                    got = g.switch()
                    if k < stops and (g.dead or got != ("stop", k)):
                        raise RuntimeError(f"lockstep: a unit ended or stopped elsewhere ({got!r}) "
                                           f"before reaching stop {k}")
                    if k == stops and not g.dead:
                        raise RuntimeError(f"lockstep: a unit went past the last stop ({got!r})")
                if k < stops:
                    self.at_stop(k)
        finally:
            for g in lets:      # after an error: unwind the units still halted (their hooks, contexts)
                if g and not g.dead:
                    g.throw(GreenletExit)
