"""What every run's settings dataclass shares: a plain dict for config.json, and back."""
from __future__ import annotations

from dataclasses import asdict, fields


class Settings:
    """Mixin for settings dataclasses written to and read from RUN/config.json."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """The settings in `d`, ignoring keys that are not fields (run facts stored beside them)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
