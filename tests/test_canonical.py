"""Rank-equivalence keys: equal keys must mean equal per-row rankings; some must differ."""
import random
from collections import defaultdict

import pytest
import torch

from prunerzero import DegenerateMetricError, Metric, MetricError
from prunerzero.language.symbolic import Exp, Sigmoid, Tanh

from helpers import primitives, random_expr


def row_ranking(metric: Metric, p) -> torch.Tensor:
    scores = metric.compile()(**p, dtype=torch.float64, check=True)
    return torch.argsort(scores, dim=-1, stable=True)


def row_mask(metric: Metric, p, sparsity=0.5) -> torch.Tensor:
    scores = metric.compile()(**p, dtype=torch.float64)
    k = int(scores.shape[-1] * sparsity)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, torch.topk(scores, k, largest=False).indices, True)


SAME = [
    ("sqr(W)*mms(G)", "abs(W)*sqrt(mms(G))"),
    ("pruner-zero", "sqr(W)*mms(G)"),
    ("wanda", "exp(log(sqrt(sqr(W))))*X"),
    ("abs(W)*X", "log(abs(W)*X)"),
    ("abs(W)*X", "2*abs(W)*X + 3"),
    ("abs(W)*X", "sqrt(abs(W)*X)"),
    ("abs(W)*X", "sqr(W)*sqr(X)"),
    ("abs(W)*X", "tanh(abs(W)*X)"),
    ("abs(W)*X", "mms(abs(W)*X)"),
    ("abs(W)*X", "zsn_row(abs(W)*X)"),
    ("abs(W)*X", "abs(W)*X*(rowsum(abs(W)) + 1) - rowsum(G)"),
    ("abs(W)", "abs(W)/rowsum(abs(W))"),
    ("W*X", "exp(W*X)"),
    ("-abs(W)", "neg(exp(abs(W)))"),
    ("ria", "sqr(abs(W)/colsum(abs(W)) + abs(W)/rowsum(abs(W)))*X"),
]

DIFFERENT = [
    ("abs(W)*X", "abs(W)*sqr(X)"),
    ("W", "abs(W)"),
    ("abs(W)*X", "abs(W) + X"),
    ("W*X", "-W*X"),
    ("abs(W)", "abs(W)*colsum(abs(W))"),   # a column sum varies along the row
    ("abs(W)*X", "abs(W)*X*rowsum(W)"),     # a row factor of unknown sign may reverse a row
    ("abs(W)*G", "sqr(W)*G"),
    ("wanda", "ria"),
    ("wanda", "pruner-zero"),
]


@pytest.mark.parametrize("a, b", SAME)
def test_equivalent_metrics_share_a_key_and_a_ranking(a, b):
    ma, mb = Metric.parse(a), Metric.parse(b)
    assert ma.canonical() == mb.canonical()
    for seed in range(3):
        p = primitives(seed=seed)
        assert torch.equal(row_ranking(ma, p), row_ranking(mb, p))


@pytest.mark.parametrize("a, b", DIFFERENT)
def test_different_metrics_have_different_keys_and_masks(a, b):
    ma, mb = Metric.parse(a), Metric.parse(b)
    assert ma.canonical() != mb.canonical()
    assert not torch.equal(row_mask(ma, primitives(seed=0)), row_mask(mb, primitives(seed=0)))


SATURATING = (Tanh, Sigmoid, Exp)


def test_keys_are_sound_on_random_metrics():
    """Every group of random metrics sharing a key ranks every row identically (metrics
    with saturating functions excluded: see the test below)."""
    rng = random.Random(7)
    groups = defaultdict(list)
    for _ in range(2000):
        try:
            m = Metric.parse(random_expr(rng, 3))
        except DegenerateMetricError:
            continue
        groups[m.canonical()].append(m)
    shared = [g for g in groups.values() if len(g) > 1]
    assert len(shared) >= 15, "the random sample should produce key collisions to check"
    p = primitives(seed=3)
    checked = 0
    for group in shared:
        rankings = []
        for m in group:
            if m.simplify().expr.has(*SATURATING):
                continue
            try:  # rounding can swamp a metric (x + 1e30): the score check reports it as degenerate
                rankings.append((m, row_ranking(m, p)))
            except MetricError:
                continue
        for m, r in rankings[1:]:
            assert torch.equal(rankings[0][1], r), (str(rankings[0][0]), str(m))
            checked += 1
    assert checked >= 15


def test_saturation_is_why_masks_need_their_own_fingerprint():
    """tanh is strictly increasing, so the keys agree, but tanh(50) == 1.0 in floating point."""
    a, b = Metric.parse("tanh(tanh(W/G))"), Metric.parse("W/G")
    assert a.canonical() == b.canonical()
    p = primitives(seed=3)
    assert not torch.equal(row_mask(a, p), row_mask(b, p))
