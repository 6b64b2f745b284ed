"""`load_model`: any model by HF id or folder, including the smaller models `prunerzero darwin`
saves, with its tokenizer. It sits above models.py (plain checkpoints) and structured/ (darwin
folders), so neither needs to know the other."""
from __future__ import annotations

from pathlib import Path

from .errors import PrunerZeroError
from .engine.models import (ModelError, concrete_dtype, load_error, load_pretrained, resolve_device, resolve_dtype,
                            resolve_path)
from .structured.shrink import STRUCTURE_FILE, load_structured


def load_model(name: str | None = None, dtype="auto", device: str | None = "auto", tokenizer: bool = True,
               onload: str = "auto"):
    """(model, tokenizer) from a HF id, a local folder, or None / 'smollm2-135m' for the default;
    dtype: "auto" (the checkpoint's, see models.concrete_dtype), fp32, bf16 or fp16; tokenizer=False
    skips the tokenizer (returned as None), e.g. in search workers. onload: "auto" keeps the model
    in host memory and runs it on `device` one decoder block at a time when it would not fit
    there whole (see models.place), "always" or "never" force the choice. A darwin folder is
    rebuilt by the library's own code (never by the remote code saved beside it)."""
    from transformers import AutoTokenizer
    path = resolve_path(name)
    device = resolve_device(device)
    dtype = concrete_dtype(path, dtype, str(device)) if dtype == "auto" else dtype
    tok = load_tokenizer(name, path) if tokenizer else None
    try:
        if (Path(path) / STRUCTURE_FILE).is_file():
            return load_structured(path, resolve_dtype(dtype), device), tok
        return load_pretrained(path, dtype, device, onload), tok
    except PrunerZeroError:
        raise
    except Exception as e:  # transformers and safetensors raise many types for a bad folder
        raise load_error(name, e) from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt")


def load_tokenizer(name, path):
    """The tokenizer of a model, or one line that blames the tokenizer files (not the model) when
    they cannot be read or turn text into no tokens."""
    from transformers import AutoTokenizer
    folder = Path(path)
    if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES) and not any(folder.glob("*.gguf")):
        raise ModelError(f"{name} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); save the "
                         "tokenizer beside the model (tokenizer.save_pretrained(folder))")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - tokenizers raise TypeError, ValueError, JSON errors, ...
        first = (str(e).strip().splitlines() or [""])[0][:200]
        if isinstance(e, OSError) and not Path(path).is_dir():
            raise load_error(name, e) from None  # a hub id that cannot be reached: about the model
        raise ModelError(f"cannot load the tokenizer of '{name}' ({type(e).__name__}: {first}): its tokenizer "
                         "files (tokenizer.json, tokenizer_config.json) are damaged or of another format") from None
    try:
        empty = len(tok) == 0 or not tok("The quick brown fox jumps.", add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001
        empty = True
    if empty:
        raise ModelError(f"the tokenizer of '{name}' has an empty vocabulary (it turns text into no tokens): "
                         "its tokenizer files are damaged")
    return tok

