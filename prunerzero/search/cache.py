"""What the search remembers about candidates, across generations and resumed runs:
metric text -> (simplified text, canonical key) or why it is invalid; canonical key -> mask
fingerprint; fingerprint -> NLL of the chunks measured so far. Rank-equivalent metrics share
a key, different keys that give the same masks share a fingerprint: neither is evaluated twice."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import PrunerZeroError
from ..language.metric import Metric


@dataclass
class Measured:
    """NLL of consecutive chunk ranges [0, k1), [k1, k2), ... of the search set."""
    segments: list = field(default_factory=list)   # (lo, hi, nll, tokens)

    @property
    def done(self) -> int:
        return self.segments[-1][1] if self.segments else 0

    def add(self, lo, hi, nll, tokens) -> bool:
        if lo != self.done or hi <= lo:
            return False
        self.segments.append((lo, hi, nll, tokens))
        return True

    def perplexity(self, k: int) -> float:
        """exp(mean NLL) of the first k chunks; when a segment runs past k (these masks were
        measured further in one go, as a baseline or a promoted twin), of the segments that
        cover the first k chunks: a few more chunks, never fewer."""
        cover = [s for s in self.segments if s[0] < k]
        tokens = sum(s[3] for s in cover)
        return math.exp(sum(s[2] for s in cover) / tokens) if tokens and self.done >= k else math.inf


@dataclass
class Cache:
    meta: dict = field(default_factory=dict)        # text -> (simplified, key) or ("", error)
    by_key: dict = field(default_factory=dict)      # key -> fingerprint, or "!" + error
    by_fp: dict = field(default_factory=dict)       # fingerprint -> Measured

    def describe(self, text: str) -> tuple[str, str | None, str | None]:
        """(simplified text, canonical key, error) of a metric, computed once per text."""
        if text not in self.meta:
            try:
                m = Metric.parse(text)
                self.meta[text] = (str(m.simplify()), m.canonical())
            except (PrunerZeroError, ValueError, TypeError, RecursionError, OverflowError) as e:
                self.meta[text] = ("", f"{type(e).__name__}: {e}")
        simplified, second = self.meta[text]
        return (simplified, second, None) if simplified else ("", None, second)

    def measured(self, key: str) -> Measured | None:
        fp = self.by_key.get(key)
        return self.by_fp.get(fp) if fp and not fp.startswith("!") else None

    def failure(self, key: str) -> str | None:
        fp = self.by_key.get(key, "")
        return fp[1:] if fp.startswith("!") else None

    def known(self) -> dict[str, int]:
        return {fp: m.done for fp, m in self.by_fp.items()}
