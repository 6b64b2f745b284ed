"""What every run's settings dataclass shares: a plain dict for config.json, and back."""
from __future__ import annotations

from dataclasses import asdict, fields

from .checks import SettingsError


class Settings:
    """Mixin for settings dataclasses written to and read from RUN/config.json."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """The settings in `d`, ignoring keys that are not fields (run facts stored beside them);
        values of the wrong type (a hand-edited config.json) are a SettingsError, not a traceback."""
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except SettingsError:
            raise
        except (TypeError, ValueError) as e:
            raise SettingsError(f"the settings are invalid ({e}); start a new run") from None
