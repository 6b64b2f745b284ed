"""The folder a command saves its result to (`apply --output`, a darwin model), written whole or
not at all, by one process, without touching anything of the user's.

- Checked before any work: a symlink is followed to its target, and a dangling one or a loop is
  refused; the target must be absent or an empty folder, in a writable parent with room for the
  estimated size.
- Locked while the command runs (locks.FolderLock on a hidden file beside it): a second writer
  fails at once.
- Written into a private temporary folder beside the target (mkdtemp, holding a marker file), then
  renamed onto it: a crash, Ctrl-C or SIGTERM leaves no half-written output, and the temporary
  folder is removed. Leftovers of killed runs are removed later only when they hold the marker and
  their process is gone; a user's own folder of any name is never touched.
- Any OSError while writing (a full disk, a read-only file system) becomes one SaveError that
  says nothing was saved and why."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from .. import checks
from ..errors import PrunerZeroError
from .locks import FolderLock, lock_beside

MARKER = ".prunerzero-partial"   # inside every temporary folder this module creates


class SaveError(PrunerZeroError):
    """The result could not be written; nothing was saved."""


def resolve_target(option: str, value) -> Path:
    """The real folder behind --output: symlinks followed, dangling ones and loops refused."""
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise checks.SettingsError(f"{checks.flag(option)} must name a folder, got {value!r}")
    path = Path(value)
    if path.is_symlink():
        try:
            real = path.resolve(strict=False)
        except (RuntimeError, OSError):
            raise checks.SettingsError(f"{checks.flag(option)} {path} is a symlink loop") from None
        if not real.exists():
            raise checks.SettingsError(f"{checks.flag(option)} {path} is a symlink to {real}, which does not exist")
        return real
    try:
        return path.resolve(strict=False)
    except (RuntimeError, OSError):
        raise checks.SettingsError(f"{checks.flag(option)} {path}: a folder above it is a symlink loop") from None


class Output:
    """`Output(path).check(size)` before the work, `.save(write)` after it; `.close()` always."""

    def __init__(self, value, option: str = "output"):
        self.shown, self.option = str(value), option
        self.path = resolve_target(option, value)
        self.lock: FolderLock | None = None

    def check(self) -> "Output":
        """Refuse now what would fail at the save: a file or non-empty folder in the way, a parent
        that cannot be written; then hold the lock."""
        checks.output_folder(self.option, self.path, optional=False)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise checks.SettingsError(f"{checks.flag(self.option)} {self.shown}: {_reason(e)}") from None
        self.lock = lock_beside(self.path, self.shown)
        remove_leftovers(self.path)
        return self

    def room(self, estimated_bytes: int) -> None:
        """Refuse a result that the disk cannot hold (called once its size is known)."""
        free = shutil.disk_usage(self.path.parent).free
        if free < estimated_bytes * 1.05:
            raise checks.SettingsError(
                f"{checks.flag(self.option)} {self.shown}: the result needs about {_gib(estimated_bytes)} and "
                f"{self.path.parent} has {_gib(free)} free; free some space or save elsewhere")

    def save(self, write, replace: bool = False) -> Path:
        """write(folder) fills a private temporary folder, which then becomes the output; with
        replace, an existing output (one this process owns, such as a run folder's model) is
        swapped out and removed only once the new one is in place."""
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".prunerzero-tmp", dir=self.path.parent))
            (tmp / MARKER).write_text(str(os.getpid()))
            write(tmp)
            (tmp / MARKER).unlink()
            _usual_modes(tmp)
            old = None
            if replace and self.path.is_dir() and not self.path.is_symlink() and any(self.path.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old.", dir=self.path.parent))
                os.rename(self.path, old / "x")
            _replace(tmp, self.path)
            tmp = None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            raise SaveError(f"nothing was saved to {self.shown}: {_reason(e)}") from None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return self.path

    def close(self):
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _replace(tmp: Path, target: Path):
    """Rename the finished folder onto the target (absent, or the empty folder that was checked);
    a folder someone else filled meanwhile is never overwritten."""
    try:
        if target.is_dir() and not target.is_symlink():
            os.rmdir(target)  # fails unless still empty
        os.rename(tmp, target)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise OSError(e.errno, f"{target} was filled by something else while this run worked") from None
        raise


def remove_leftovers(target: Path):
    """Temporary folders of earlier writers of `target` whose process is gone (killed mid-save)."""
    for p in target.parent.glob(f".{glob_escape(target.name)}.*.prunerzero-tmp"):
        if p.is_symlink() or not p.is_dir() or not (p / MARKER).is_file():
            continue
        try:
            pid = int((p / MARKER).read_text().strip())
        except (OSError, ValueError):
            continue
        if not _alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _usual_modes(folder: Path):
    """The modes a plain `cp` would give under the user's umask (mkdtemp makes 0700, and some
    writers 0600 files): an output others on the machine may read, like the rest of their files."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(Path(root) / d, 0o777 & ~mask)
        for f in files:
            os.chmod(Path(root) / f, 0o666 & ~mask)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def _reason(e: OSError) -> str:
    what = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
            errno.EDQUOT: "the disk quota is exceeded", errno.EACCES: "permission denied"}.get(e.errno)
    where = f" (writing {Path(e.filename).name})" if getattr(e, "filename", None) else ""
    return (what or e.strerror or str(e)) + where
