"""engine.lockstep: coroutines that stop together. Checked: every unit reaches each stop before
the stop's action runs, in unit order, on the caller's thread; errors (in a unit, in an action, a
unit that skips a stop or goes past the last) reach the caller and unwind the other units; grad
mode is the caller's."""
import threading

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


def test_the_units_run_in_order_on_the_callers_thread():
    log = []

    def work(unit, sync):
        for k in range(2):
            log.append((unit, k, threading.get_ident()))
            sync(k)
    Lockstep(lambda k: None).run(work, range(4), 2)
    assert [(u, k) for u, k, _ in log] == [(u, k) for k in range(2) for u in range(4)]
    assert {t for _, _, t in log} == {threading.get_ident()}


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
    assert reached == []


def test_a_unit_that_skips_a_stop_is_an_error_not_a_hang():
    def work(unit, sync):
        if unit != 0:
            sync(0)
    ran = []
    with pytest.raises(RuntimeError, match="before reaching stop 0"):
        Lockstep(ran.append).run(work, range(3), 1)
    assert ran == []        # the stop never ran short of unit 0

    def out_of_order(unit, sync):
        sync(1)
    with pytest.raises(RuntimeError, match="before reaching stop 0"):
        Lockstep(ran.append).run(out_of_order, range(2), 2)

    def one_too_many(unit, sync):
        sync(0)
        sync(1)
    with pytest.raises(RuntimeError, match="past the last stop"):
        Lockstep(ran.append).run(one_too_many, range(2), 1)
    assert ran == [0]


def test_a_unit_halted_at_an_error_is_unwound():
    exited = []

    def work(unit, sync):
        try:
            sync(0)
            if unit == 0:
                raise ValueError("unit 0")
            sync(1)
        finally:
            exited.append(unit)     # a hook's or a context's clean-up runs
    with pytest.raises(ValueError):
        Lockstep(lambda k: None).run(work, range(3), 2)
    assert sorted(exited) == [0, 1, 2]


def test_grad_mode_is_the_callers():
    seen = []

    def work(unit, sync):
        seen.append(torch.is_grad_enabled())
        sync(0)
    with torch.no_grad():
        Lockstep(lambda k: None).run(work, range(2), 1)
    Lockstep(lambda k: None).run(work, range(2), 1)
    assert seen == [False, False, True, True]
