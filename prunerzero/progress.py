"""Messages and progress bars: one `prunerzero` logger and one bar helper, both silenced by quiet
mode (the CLI's --quiet, or set_quiet in a notebook).

A library user sees nothing until they configure logging (logging.basicConfig(level=INFO)
shows everything); the CLI sends the logger's lines to stderr and its results to stdout.
Bars disappear when done, so each leaves one log line saying what it did and how long it took:
a log file shows every long step that ran."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from tqdm.auto import tqdm

logger = logging.getLogger("prunerzero")
_state = {"quiet": False}


def set_quiet(quiet: bool = True) -> None:
    """No bars (transformers' own, loading and saving weights, included), and only warnings
    and errors from the logger."""
    _state["quiet"] = quiet
    logger.setLevel(logging.WARNING if quiet else logging.NOTSET)
    _transformers_bars(not quiet)


def _transformers_bars(shown: bool) -> None:
    """transformers' progress bars off in quiet mode; leaving it gives back the setting they
    had before (a user who turned them off keeps them off)."""
    if shown and "transformers_bars" not in _state:
        return   # never hidden here: nothing to give back (and no import on the way)
    from transformers.utils import logging as hf_logging
    if not shown:
        _state.setdefault("transformers_bars", hf_logging.is_progress_bar_enabled())
        hf_logging.disable_progress_bar()
    elif _state.pop("transformers_bars"):
        hf_logging.enable_progress_bar()


@contextmanager
def silenced():
    """Quiet mode for a block (a probe whose bars and lines would only confuse)."""
    saved, level = _state["quiet"], logger.level
    set_quiet(True)
    try:
        yield
    finally:
        set_quiet(saved)
        logger.setLevel(level)


def quiet() -> bool:
    return _state["quiet"]


def log(message: str) -> None:
    """The default `log` callback of every run function: an INFO line of the prunerzero logger."""
    logger.info(message)


_callbacks = [log]   # where say() sends a message: the innermost run function's `log`


@contextmanager
def saying(callback=None):
    """Inside, say() sends each message to `callback` (None: where it sent them already). A run
    function's `log` argument (the CLI's stdout, a notebook's list) so reaches every step it
    calls without being passed down to each."""
    _callbacks.append(callback or _callbacks[-1])
    try:
        yield
    finally:
        _callbacks.pop()


def say(message: str) -> None:
    """A message of the work in progress, to the callback of the run function it is part of
    (an INFO line of the logger outside any)."""
    _callbacks[-1](message)


class bar(tqdm):
    """tqdm, off in quiet mode or with enabled=False; when it closes after running it logs
    "desc: n steps in s" (INFO) unless done_line=False (bars nested in a step of their own)."""

    def __init__(self, iterable=None, desc: str = "", enabled: bool = True, done_line: bool = True, **kw):
        kw.setdefault("leave", False)
        self._t0, self._done_line, self._logged = time.perf_counter(), done_line and enabled, False
        super().__init__(iterable, desc=desc, disable=quiet() or not enabled, **kw)

    def close(self):
        if self._done_line and not self._logged and self.n:
            self._logged = True
            logger.info(f"{self.desc.rstrip(': ')}: {self.n} steps in {time.perf_counter() - self._t0:.1f} s")
        super().close()
