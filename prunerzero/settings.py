"""What the runs' settings dataclasses share: a plain dict for config.json, and back; and the
zero-shot task settings of eval, apply and darwin."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from . import checks
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


# what a resumed run may be given anew: how long it runs and where its candidates are scored;
# every other setting is the run's own (its config.json), so the run stays one experiment
RESUMABLE = ("generations", "time_limit", "workers", "threads", "ray", "ray_address", "gpus_per_worker")


def resume_overrides(overrides: dict | None, generations=None, time_limit=None) -> dict:
    """The overrides of a resume, with the run functions' own generations and time_limit arguments
    folded in when given."""
    given = {k: v for k, v in (("generations", generations), ("time_limit", time_limit)) if v is not None}
    return dict(overrides or {}, **given)


def with_overrides(config, overrides: dict | None, also: tuple = ()):
    """`config` (a resumed run's settings) with the `overrides` a resume may give, validated; any
    other setting is refused with one line naming its option."""
    for name, value in (overrides or {}).items():
        if name not in RESUMABLE + also:
            allowed = ", ".join(checks.flag(n) for n in RESUMABLE + also)
            raise SettingsError(f"{checks.flag(name)} cannot change on --resume: a run keeps the settings it "
                                f"started with (its config.json); only {allowed} may be given")
        setattr(config, name, value)
    config.validate()
    return config


@dataclass
class TaskSettings:
    """Zero-shot tasks through lm-eval (see zeroshot.py), shared by eval, apply and darwin;
    no tasks: perplexity only."""
    tasks: tuple = ()                 # lm-eval task names, or wiki_lastword (offline)
    num_fewshot: int | None = None
    task_batch_size: int = 8
    task_limit: float | None = None   # documents per task: a count, or a fraction below 1
    include_path: str | None = None   # a folder of the user's own task YAML

    def validate_tasks(self):
        if isinstance(self.tasks, str):
            self.tasks = tuple(t.strip() for t in self.tasks.split(",") if t.strip())
        self.tasks = tuple(self.tasks)
        checks.integer("num_fewshot", self.num_fewshot, minimum=0, optional=True)
        checks.integer("task_batch_size", self.task_batch_size)
        checks.number("task_limit", self.task_limit, low=0, low_open=True, optional=True)
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise checks.SettingsError(f"--include-path {self.include_path} is not a folder of task YAML files")
