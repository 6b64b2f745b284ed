"""engine.lockstep: threads that stop together. Checked: every unit reaches each stop before the
stop's action runs, one thread computes at a time, errors (in a unit, in an action, a unit that
skips a stop) end every thread and reach the caller, and grad mode carries into the threads."""
import threading
import time

import pytest
import torch

from prunerzero.engine.lockstep import Lockstep


def test_every_unit_reaches_a_stop_before_its_action_and_goes_on_after():
    log, stops = [], 3

    def at_stop(k):
        log.append(("stop", k))

    def work(unit, sync):
        for k in range(stops):
            log.append((unit, k))
            sync(k)
    Lockstep(at_stop).run(work, range(5), stops)
    for k in range(stops):
        at = log.index(("stop", k))
        before = {u for u, j in log[:at] if u != "stop" and j == k}
        after = {u for u, j in log[at + 1:] if u != "stop" and j == k}
        assert before == set(range(5)) and not after
    assert [e for e in log if e[0] == "stop"] == [("stop", k) for k in range(stops)]


def test_one_thread_computes_at_a_time():
    busy, most = [0], [0]
    lock = threading.Lock()

    def work(unit, sync):
        for k in range(3):
            with lock:
                busy[0] += 1
                most[0] = max(most[0], busy[0])
            time.sleep(0.002)       # a thread that held no turn would overlap here
            with lock:
                busy[0] -= 1
            sync(k)
    Lockstep(lambda k: None).run(work, range(6), 3)
    assert most[0] == 1


def test_an_error_in_a_unit_or_an_action_reaches_the_caller_and_ends_every_thread():
    def work(unit, sync):
        sync(0)
        if unit == 2:
            raise ValueError("unit 2")
        sync(1)
    with pytest.raises(ValueError, match="unit 2"):
        Lockstep(lambda k: None).run(work, range(4), 2)

    def bad_stop(k):
        if k == 1:
            raise KeyError("stop 1")
    reached = []

    def work2(unit, sync):
        sync(0)
        sync(1)
        reached.append(unit)    # nobody goes past a failed stop
    with pytest.raises(KeyError, match="stop 1"):
        Lockstep(bad_stop).run(work2, range(4), 2)
    assert reached == [] and threading.active_count() < 10


def test_a_unit_that_skips_a_stop_is_an_error_not_a_hang():
    def work(unit, sync):
        if unit != 0:
            sync(0)
    ran = []
    with pytest.raises(RuntimeError, match="before reaching a stop"):
        Lockstep(ran.append).run(work, range(3), 1)
    assert ran == []        # the stop never ran short of unit 0

    def out_of_order(unit, sync):
        sync(1)
    with pytest.raises(RuntimeError, match="stop 1 reached where stop 0"):
        Lockstep(ran.append).run(out_of_order, range(2), 2)


def test_grad_mode_carries_into_the_threads():
    seen = []

    def work(unit, sync):
        seen.append(torch.is_grad_enabled())
        sync(0)
    with torch.no_grad():
        Lockstep(lambda k: None).run(work, range(2), 1)
    Lockstep(lambda k: None).run(work, range(2), 1)
    assert seen == [False, False, True, True]
