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
    """No bars, and only warnings and errors from the logger."""
    _state["quiet"] = quiet
    logger.setLevel(logging.WARNING if quiet else logging.NOTSET)


@contextmanager
def silenced():
    """Quiet mode for a block (a probe whose bars and lines would only confuse)."""
    saved, level = _state["quiet"], logger.level
    set_quiet(True)
    try:
        yield
    finally:
        _state["quiet"] = saved
        logger.setLevel(level)


def quiet() -> bool:
    return _state["quiet"]


def log(message: str) -> None:
    """The default `log` callback of every run function: an INFO line of the prunerzero logger."""
    logger.info(message)


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
