"""The update and allocation parts of a recipe genome (`evolve --search metric,update,allocation`).

The update part: a candidate carries, next
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
    "staged": (0, 1),
}
OBS_LADDERS = {
    "kind": ("obs", "obs-adaptive"),
    "percdamp": (0.003, 0.01, 0.03, 0.1),
    "blocksize": (32, 64, 128),
    "correct": (0.0, 0.1, 0.2, 0.3),
    "staged": (0, 1),
}


SETTINGS = tuple(sorted(set(ADMM_LADDERS) | set(OBS_LADDERS)))


def ladders(update: Update, fixed=()) -> dict:
    """The ladders of the settings searched for this update's family, less the `fixed` ones."""
    family = ADMM_LADDERS if update.is_admm else OBS_LADDERS if update.kind.startswith("obs") else {}
    return {name: values for name, values in family.items() if name not in fixed}


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
    return dataclasses.replace(update, **fields).settled()


def mutate(text: str, rng=random, fixed=()) -> str:
    """One setting (not a `fixed` one) moved one or two rungs along its ladder (or, for the kind,
    swapped)."""
    update = Update.parse(text)
    ladder = ladders(update, fixed)
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
    return _set(update, name, values[j]).spec()


def cross(a: str, b: str, rng=random, fixed=()) -> tuple[str, str]:
    """Uniform crossover: each setting of the family (but the `fixed` ones) swapped between the
    two with even odds."""
    ua, ub = Update.parse(a), Update.parse(b)
    ladder = ladders(ua, fixed)
    if not ladder or ladders(ub, fixed) != ladder:
        return a, b
    for name in sorted(ladder):
        if rng.random() < 0.5:
            va, vb = _value(ua, name), _value(ub, name)
            ua, ub = _set(ua, name, vb), _set(ub, name, va)
    return ua.spec(), ub.spec()


def fresh(text: str, rng=random, fixed=()) -> str:
    """Settings drawn at random from every ladder of the update's family; the `fixed` ones kept."""
    update = Update.parse(text)
    for name, values in sorted(ladders(update, fixed).items()):
        update = _set(update, name, rng.choice(values))
    return update.spec()


# ---- the allocation part: a sparsity level per (block, layer kind) --------------------------

def group_of(name: str) -> tuple[int, str]:
    """(decoder block, "attn" or "mlp") of a prunable layer name ("layers.3.self_attn.q_proj")."""
    parts = name.split(".")
    block = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1
    return block, "attn" if any("attn" in p or "attention" in p for p in parts) else "mlp"


class AllocationGenes:
    """Per-layer sparsity as a genome: the layers of each decoder block's attention and of its
    MLP form a group, each group sits at a level of the allocation search's ladder (target +-
    levels * step), and a genome keeps exactly the uniform genome's count of kept weights. The
    mutation is the level switch of structured/genome.py (each switch compensated elsewhere to the
    weight), as the allocation search uses it; engine.allocation.layer_counts then makes each
    layer's count exact."""

    def __init__(self, sizes: dict[str, int], sparsity: float, step: float = 0.025, levels: int = 4,
                 max_sparsity: float = 0.95):
        from ..structured.genome import LevelSpace
        from .allocation import AllocationSearchConfig, ladder
        self.sparsity = sparsity
        self.levels = ladder(sparsity, AllocationSearchConfig(step=step, levels=levels, max_sparsity=max_sparsity))
        self.groups = sorted({group_of(n) for n in sizes})
        self.members = {g: [n for n in sizes if group_of(n) == g] for g in self.groups}
        mid = self.levels.index(sparsity)
        # kept weights per level, in whole steps of each layer (round(size * step)): groups of one
        # shape then gain and lose exactly the same count a level up or down, so switches can
        # compensate each other to the weight
        cost = [[sum(sizes[n] - int(sizes[n] * sparsity) - (lv - mid) * round(sizes[n] * step)
                     for n in self.members[g]) for lv in range(len(self.levels))] for g in self.groups]
        self.space = LevelSpace(cost, ladder=self.levels)
        self.start = (mid,) * len(self.groups)

    def text(self, genome) -> str:
        """A genome as text: one character per group, the level's offset from the target ('0' is
        the target, 'a'... above it (more pruned), 'A'... below)."""
        mid = self.start[0]
        return "".join("0" if g == mid else chr(ord("a") + g - mid - 1) if g > mid else chr(ord("A") + mid - g - 1)
                       for g in genome)

    def parse(self, text: str) -> tuple[int, ...]:
        mid = self.start[0]
        out = tuple(mid if ch == "0" else mid + ord(ch) - ord("a") + 1 if ch.islower() else mid - (ord(ch) - ord("A") + 1)
                    for ch in text)
        if len(out) != len(self.groups) or any(not 0 <= g < len(self.levels) for g in out) or \
                self.space.params(out) != self.space.params(self.start):
            raise ValueError(f"not an allocation of this model's {len(self.groups)} groups: {text!r}")
        return out

    def mutate(self, text: str, rng=random, switches: int = 1) -> str:
        return self.text(self.space.mutate(self.parse(text), rng, switches=switches, reach=2))

    def fresh(self, rng=random) -> str:
        return self.mutate(self.text(self.start), rng, switches=max(1, len(self.groups) // 4))

    def sparsity_of(self, text: str) -> dict[str, float]:
        """Each layer's sparsity under the genome (layer_counts scales them to the exact total)."""
        return {n: self.levels[lv] for g, lv in zip(self.groups, self.parse(text)) for n in self.members[g]}
