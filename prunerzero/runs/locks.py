"""One writer per folder: an advisory lock (flock) that a process holds while it writes a run
folder or an `apply` output, so a second process fails at once with one line instead of
interleaving logs or deleting the other's files. The kernel drops the lock when the holder
dies, however it dies, so a killed run never leaves a folder locked."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import PrunerZeroError


class BusyError(PrunerZeroError):
    """Another process is writing the same folder."""


class FolderLock:
    """Holds `path` (a lock file) for as long as the object lives or until release()."""

    def __init__(self, path: Path, what: str, remove: bool = False):
        self.path, self.what, self.remove, self.fd = Path(path), what, remove, None

    def acquire(self) -> "FolderLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = _holder(self.path)
                raise BusyError(f"{self.what} is being written by another prunerzero process{holder}; "
                                "wait for it to finish (or stop it) and try again") from None
            # a holder that removes its lock file on release may have done so between our open
            # and our flock: then we hold a lock on a file nobody else will ever open; retry
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self):
        if self.fd is None:
            return
        if self.remove:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def lock_beside(folder: Path, what: str) -> FolderLock:
    """The held lock of `folder` (a run folder, an output): a hidden file beside it, so nothing is
    written into the folder itself and a run that fails its checks leaves nothing behind; removed
    on release."""
    folder = Path(folder)
    return FolderLock(folder.parent / f".{folder.name}.prunerzero-lock", what, remove=True).acquire()


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
