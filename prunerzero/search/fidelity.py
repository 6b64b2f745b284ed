"""How far a search can trust its cheap stages: before generation 0, a set of varied
candidates (the baselines, the seed metrics, then fresh random trees) is scored on every stage,
and each stage's ranking is compared with the last stage's (Spearman's rank correlation). A
stage that ranks unlike the last one promotes the wrong candidates; this makes that visible
in RUN/stage_check.json, in the log, and in the benchmark."""
from __future__ import annotations

import math
import random

import numpy as np

from .evolve import _finite
from .gp import from_text


def ranks(values) -> np.ndarray:
    """Ranks 1..n of `values`, ties given the mean of the ranks they span."""
    v = np.asarray(values, dtype=float)
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(1, len(v) + 1)
    for x in np.unique(v):
        tie = v == x
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def spearman(a, b) -> float | None:
    """Spearman's rank correlation of two equally long sequences (the Pearson correlation of
    their ranks); None when fewer than 3 pairs or either side is constant."""
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} values against {len(b)}")
    if len(a) < 3:
        return None
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else None


def check_candidates(search, n: int) -> list:
    """n varied candidates with distinct keys: the baselines, the seed metrics, then mutants of
    the seeds (one to three mutations each; up to two thirds of n), then fresh random trees. The
    mutants are what the stages must rank well, near-misses of good metrics; random trees
    are mostly degenerate and only show that broken metrics are told from usable ones. The
    global RNG is put back after, so the search that follows is the one a run without the
    check makes."""
    c, out, taken = search.config, [], set()

    def take(candidate) -> None:
        key = search.key(candidate)
        if key is not None and key not in taken and len(out) < n:
            out.append(str(candidate))
            taken.add(key)
    for text in (*c.baselines, *c.seed_metrics):
        take(text)
    state = random.getstate()
    try:
        random.seed(f"stage-check {c.seed}")
        seeds = [from_text(t, search.pset) for t in c.seed_metrics] if c.searches("metric") else []
        for _ in range(50 * n if seeds else 0):
            if len(out) >= (2 * n) // 3:
                break
            mutant = search.tb.clone(random.choice(seeds))
            for _ in range(random.randint(1, 3)):
                mutant, = search.tb.mutate(mutant)
            take(mutant)
        for _ in range(50 * n):
            if len(out) >= n:
                break
            take(search._valid_fresh(taken))
    finally:
        random.setstate(state)
    return out


USABLE = 10.0   # a candidate whose last-stage perplexity is within this factor of the best's


def usable_spearman(pairs) -> tuple[float | None, int]:
    """(Spearman, count) over the (stage, last stage) pairs whose last-stage figure is within
    USABLE times the best one's; None when fewer than 3."""
    pairs = list(pairs)
    best = min((b for _, b in pairs), default=math.inf)
    usable = [(a, b) for a, b in pairs if b <= USABLE * best]
    return (spearman(*zip(*usable)) if len(usable) >= 3 else None), len(usable)


def stage_check(search, n: int) -> dict:
    """Score n varied candidates on every stage (no promotion) and correlate each stage's
    perplexities with the last stage's over the candidates finite on both, and over the usable
    ones among them (last stage within USABLE times the best): degenerate metrics (perplexity
    1e7 and more) are easy to rank, so the correlation over all can look better than the
    ordering of good candidates, which is what promotion has to get right."""
    c = search.config
    texts = check_candidates(search, n)
    per_stage = []
    for s, k in enumerate(search.stages):
        ppl = search._measure(texts, k, f"stage check: stage {s + 1}/{len(search.stages)} ({search.stage_what(s)})",
                              tag="stage-check", **search.how(s))
        per_stage.append([ppl[search.key(t)] for t in texts])
    last = per_stage[-1]
    stages = []
    for s, figures in enumerate(per_stage):
        pairs = [(a, b) for a, b in zip(figures, last) if math.isfinite(a) and math.isfinite(b)]
        good, n_good = usable_spearman(pairs)
        stages.append(dict(stage=s + 1, chunks=search.stages[s], pruning=c.stage_mode(s),
                           tokens=c.screen_tokens if c.screens(s) else c.seqlen,
                           spearman=spearman(*zip(*pairs)) if len(pairs) >= 3 else None, candidates=len(pairs),
                           spearman_usable=good, usable=n_good))
    return dict(stages=stages, update=c.update, fitness=c.fitness, fitness_samples=c.fitness_samples,
                candidates=[dict(metric=t, perplexity=[_finite(p[i]) for p in per_stage]) for i, t in enumerate(texts)])


def describe(check: dict) -> list[str]:
    """Log lines: each stage's rank correlation with the last."""
    lines = [f"stage check over {len(check['candidates'])} candidates (Spearman with the last stage):"]
    for s in check["stages"]:
        rho = "n/a" if s["spearman"] is None else f"{s['spearman']:+.3f}"
        good = "n/a" if s.get("spearman_usable") is None else f"{s['spearman_usable']:+.3f}"
        lines.append(f"  stage {s['stage']}: {s['chunks']:3d} chunks, {s['pruning']:10}  {rho}  "
                     f"({s['candidates']} finite); {good} over the {s.get('usable', 0)} usable")
    return lines
