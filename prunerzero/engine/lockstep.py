"""Forward passes run in lockstep: each batch of calibration samples in a thread of its own, one
thread computing at a time, all of them stopping at the same points of the forward until the
last arrives. A staged block is then pruned in one pass of its pruned stream: every batch halts
before a stage's layers, the stage is pruned from what they all brought, and every batch goes
on through the pruned layers (blocks.staged_block). A pass per stage is what it replaces.

Threads rather than one big batch: a 512-token sample already runs a CPU's matrix units at full
speed, and a call of 16 samples measured slower per sample (see blocks.samples_per_call), so each
thread keeps its own batch size. Only the thread that holds the turn computes, so the threads
never contend for the cores; they only keep their place in the forward while they wait."""
from __future__ import annotations

import threading
from typing import Callable, Iterable

import torch


class Aborted(Exception):
    """Raised in a waiting thread when another one failed: it unwinds without computing on."""


class Lockstep:
    """run(work, units, stops): work(unit, sync) in a thread per unit; sync(k) inside waits for all
    units to reach it, then the last one to arrive runs at_stop(k) before they all go on. Every
    unit must call sync for stops 0, 1, ... stops - 1, in that order. The first exception of any
    thread (or of at_stop) ends every thread and is raised by run."""

    def __init__(self, at_stop: Callable[[int], None]):
        self.at_stop = at_stop
        self._turn = threading.Condition()      # its lock is the turn: held while a thread computes
        self._arrived = 0
        self._round = 0
        self._alive = 0
        self._error: BaseException | None = None
        self._passed = threading.local()        # the stops a thread has passed

    def sync(self, k: int) -> None:
        """Called by a unit's thread (holding the turn) at stop k."""
        self._check()
        if k != self._passed.n:
            raise RuntimeError(f"lockstep: stop {k} reached where stop {self._passed.n} was due")
        self._passed.n += 1
        self._arrived += 1
        if self._arrived == self._alive:
            self._release(k)
            return
        mine = self._round
        while mine == self._round:
            self._turn.wait()       # hands the turn to another thread
            self._check()

    def _release(self, k: int) -> None:
        self._arrived = 0
        try:
            self.at_stop(k)
        finally:
            self._round += 1
            self._turn.notify_all()

    def _check(self) -> None:
        if self._error is not None:
            raise Aborted

    def run(self, work: Callable, units: Iterable, stops: int) -> None:
        units = list(units)
        grad = torch.is_grad_enabled()
        self._alive = len(units)

        def body(unit):
            self._passed.n = 0
            with self._turn:
                try:
                    with torch.set_grad_enabled(grad):   # grad mode is per thread
                        work(unit, self.sync)
                except Aborted:
                    pass
                except BaseException as e:   # noqa: BLE001 - handed to run's caller
                    if self._error is None:
                        self._error = e
                finally:
                    self._finish(stops)
        threads = [threading.Thread(target=body, args=(u,), daemon=True) for u in units]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        except BaseException as e:   # interrupted while waiting: stop the threads too
            with self._turn:         # (taken once the computing thread waits or ends)
                self._error = self._error or e
                self._turn.notify_all()
            for t in threads:        # each ends at its next stop: none still writes weights after
                t.join()
            raise
        if self._error is not None:
            raise self._error

    def _finish(self, stops: int) -> None:
        """A thread ends: fewer to wait for. One that passed fewer than `stops` would leave the
        others' stops short of its unit: an error, before any stop runs without it."""
        self._alive -= 1
        if self._passed.n != stops and self._error is None:
            self._error = RuntimeError(f"lockstep: a unit ended after {self._passed.n} of {stops} stops, "
                                       "before reaching a stop")
        if self._error is not None:
            self._turn.notify_all()
