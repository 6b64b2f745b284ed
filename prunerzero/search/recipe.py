"""The update part of a recipe genome (`evolve --search metric,update`): a candidate carries, next
to its metric tree, the settings of the reconstruction that follows the mask, as an update spec
("admm rho=0.5 iters=30"; reconstruct.Update.parse reads it). Each setting moves on a ladder of
values worth trying; a mutation moves one setting one or two rungs, a crossover swaps settings
between two parents. Every random draw comes from the global `random` generator, whose state
the checkpoint keeps, so a resumed search makes the same draws."""
from __future__ import annotations

import dataclasses
import random

from ..engine.reconstruct import Update

# the settings searched for each family of updates, and their ladders
# (ADMM's kind follows its refinement steps: admm-pcg when there are some, else admm)
ADMM_LADDERS = {
    "rho": (0.25, 0.5, 1.0, 2.0, 4.0),
    "iters": (10, 15, 20, 30, 40),
    "gradual": (0, 5, 10, 15, 20, 30),
    "percdamp": (0.01, 0.03, 0.1, 0.3),
    "refine": (0, 5, 10, 20),
    "correct": (0.0, 0.1, 0.2, 0.3),
}
OBS_LADDERS = {
    "kind": ("obs", "obs-adaptive"),
    "percdamp": (0.003, 0.01, 0.03, 0.1),
    "blocksize": (32, 64, 128),
    "correct": (0.0, 0.1, 0.2, 0.3),
}


def ladders(update: Update) -> dict:
    return ADMM_LADDERS if update.is_admm else OBS_LADDERS if update.kind.startswith("obs") else {}


def settled(update: Update) -> Update:
    """The update with equal settings spelled one way: a parameter at its kind's default left
    out, no more mask-changing iterations than iterations, admm-pcg with no refinement steps
    as admm: equal settings give one spec, and so one cache entry."""
    default = Update(update.kind)
    fields = dict(percdamp=None if update.damping == default.damping else update.damping)
    if update.is_admm:
        fields["gradual"] = min(update.gradual, update.iters)
        steps = update.refine_steps
        if update.kind == "admm-pcg" and not steps:
            fields["kind"] = "admm"
        fields["refine"] = None if not steps or steps == default.refine_steps else steps
    return dataclasses.replace(update, **fields)


def spec(update: Update) -> str:
    return settled(update).spec()


def _value(update: Update, name: str):
    return update.damping if name == "percdamp" else update.refine_steps if name == "refine" else getattr(update, name)


def _set(update: Update, name: str, value) -> Update:
    fields = {name: value}
    if name == "refine":
        fields.update(kind="admm-pcg" if value else "admm", refine=value or None)
    if name == "iters":
        fields["gradual"] = min(update.gradual, value)
    if name == "gradual":
        fields["gradual"] = min(value, update.iters)
    return settled(dataclasses.replace(update, **fields))


def mutate(text: str, rng=random) -> str:
    """One setting moved one or two rungs along its ladder (or, for the kind, swapped)."""
    update = Update.parse(text)
    ladder = ladders(update)
    if not ladder:
        return text
    name = rng.choice(sorted(ladder))
    values = ladder[name]
    here = _value(update, name)
    i = min(range(len(values)), key=lambda j: abs(values[j] - here) if not isinstance(here, str)
            else values[j] != here)
    step = rng.choice((-2, -1, 1, 2))
    j = min(max(i + step, 0), len(values) - 1)
    if j == i:
        j = i - 1 if i else i + 1
    return spec(_set(update, name, values[j]))


def cross(a: str, b: str, rng=random) -> tuple[str, str]:
    """Uniform crossover: each setting of the family swapped between the two with even odds."""
    ua, ub = Update.parse(a), Update.parse(b)
    ladder = ladders(ua)
    if not ladder or ladders(ub) is not ladder:
        return a, b
    for name in sorted(ladder):
        if rng.random() < 0.5:
            va, vb = _value(ua, name), _value(ub, name)
            ua, ub = _set(ua, name, vb), _set(ub, name, va)
    return spec(ua), spec(ub)


def fresh(text: str, rng=random) -> str:
    """Settings drawn at random from every ladder of the update's family."""
    update = Update.parse(text)
    for name, values in sorted(ladders(update).items()):
        update = _set(update, name, rng.choice(values))
    return spec(update)
