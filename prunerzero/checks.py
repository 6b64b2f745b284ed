"""Checks of what a user typed, made before any model or data is loaded, so a mistake costs
no work: each failure is one line that names the option (as typed on the command line) and
what it accepts. Settings dataclasses call these from their `validate()`."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from .errors import PrunerZeroError

TEXT_SOURCES = ("wikitext2", "wikipedia")
DTYPES = ("auto", "fp32", "bf16", "fp16")


class SettingsError(PrunerZeroError, ValueError):
    """A setting outside what the command accepts."""


def flag(name: str) -> str:
    """The command-line spelling of a settings field; a name given already spelled (starting
    with --, as "--update iters" for a parameter inside an option's value) is kept."""
    return name if name.startswith("--") else "--" + name.replace("_", "-")


def integer(name: str, value, minimum: int | None = 1, maximum: int | None = None, optional=False) -> int | None:
    """An int within [minimum, maximum] (bools and fractional numbers refused)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value) or value != int(value):
        raise SettingsError(f"{flag(name)} must be a whole number, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        raise SettingsError(f"{flag(name)} must be {_range(minimum, maximum)}, got {value}")
    return value


def number(name: str, value, low: float | None = None, high: float | None = None, low_open=False,
           high_open=False, optional=False) -> float | None:
    """A finite float within the given bounds (NaN and infinities refused)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not _finite(value):
        raise SettingsError(f"{flag(name)} must be a finite number, got {value!r}")
    value = float(value)
    if (low is not None and (value < low or low_open and value == low)
            or high is not None and (value > high or high_open and value == high)):
        raise SettingsError(f"{flag(name)} must be {_bounds(low, high, low_open, high_open)}, got {value:g}")
    return value


def _bounds(low, high, low_open, high_open) -> str:
    """'in (0, 1]' for two bounds, '> 0' or '<= 1' for one."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"{'<' if high_open else '<='} {high:g}"


def model_and_text(bos, dtype, device_name, seqlen) -> None:
    """The settings every command shares: how the model loads and how its text is cut."""
    from .data import BOS_CHOICES
    choice("bos", bos, BOS_CHOICES)
    choice("dtype", dtype, DTYPES)
    device(device_name)
    integer("seqlen", seqlen, minimum=2)


def choice(name: str, value, options) -> str:
    if value not in options:
        shown = ", ".join(str(o) for o in options if o is not None)
        raise SettingsError(f"{flag(name)} must be one of {shown}, got {value!r}")
    return value


def text_source(name: str, value, optional=False) -> None:
    """A named source (wikitext2[:split], wikipedia; for evaluation text, an optional one, also
    wikipedia-heldout) or a readable UTF-8 text file."""
    if value is None and optional:
        return
    if optional and value == "wikipedia-heldout":
        return
    if not isinstance(value, str) or not value:
        raise SettingsError(f"{flag(name)} must be wikitext2, wikipedia or a text file, got {value!r}")
    if value.partition(":")[0] in TEXT_SOURCES:
        return
    path = Path(value)
    if path.is_dir():
        raise SettingsError(f"{flag(name)} {value} is a folder; give a text file (or wikitext2, wikipedia)")
    if path.exists() and not path.is_file():
        raise SettingsError(f"{flag(name)} {value} is not a regular file (a device, pipe or socket); give a text file")
    if not path.is_file():
        raise SettingsError(f"{flag(name)}: no such file {value} (give wikitext2, wikipedia or a text file)")
    try:
        with open(path, encoding="utf-8") as f:
            while f.read(1 << 20):
                pass
    except UnicodeDecodeError as e:
        raise SettingsError(f"{flag(name)} {value} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                            f"offset {e.start}); give a plain text file") from None
    except OSError as e:
        raise SettingsError(f"{flag(name)} {value} cannot be read: {e.strerror}") from None


def output_folder(name: str, value, optional=True) -> Path | None:
    """A folder that can be created and written, and does not hold anything yet."""
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise SettingsError(f"{flag(name)} must name a folder, got {value!r}")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise SettingsError(f"{flag(name)} {path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()):
        raise FileExistsError(f"output folder {path} exists and is not empty")
    parent = path
    while not parent.exists():  # the nearest existing ancestor decides whether it can be created
        parent = parent.parent
    if not parent.is_dir():
        raise SettingsError(f"{flag(name)} {path}: {parent} is a file, so the folder cannot be created")
    try:  # the one sure test of writability (permission bits say nothing for root or read-only mounts)
        os.rmdir(tempfile.mkdtemp(prefix=".prunerzero-probe-", dir=parent))
    except OSError as e:
        raise SettingsError(f"{flag(name)} {path}: cannot write in {parent} ({e.strerror})") from None
    return path


def device(value) -> str:
    """auto, cpu, cuda[:i] or mps, present on this machine."""
    import torch
    if value in (None, "auto"):
        return "auto"
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise SettingsError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {value!r}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SettingsError(f"--device {value}: CUDA is not available on this machine; use --device cpu or auto")
        if dev.index is not None and dev.index >= count:
            raise SettingsError(f"--device {value}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise SettingsError(f"--device {value}: MPS is not available on this machine; use --device cpu or auto")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise SettingsError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
    return str(value)


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except TypeError:
        return False


def _range(minimum, maximum) -> str:
    if maximum is None:
        return f"at least {minimum}"
    if minimum is None:
        return f"at most {maximum}"
    return f"between {minimum} and {maximum}"
