"""Every OOS rule fires where it should and keeps the numeric value (away from protection bands)."""
from collections import Counter

import pytest
import torch

from prunerzero import Metric
from prunerzero.language.text import parse, to_sympy
from prunerzero.language.compile import interpret
from prunerzero.language.oos import RULES, simplify

from helpers import primitives

# (input, expected simplified text, rule that must fire; None: sympy's automatic arithmetic)
CASES = [
    ("exp(log(W))", "abs(W)", "exp_log"),
    ("log(exp(W*X))", "W*X", "log_exp"),
    ("div(1, div(1, W))", "W", "recip_recip"),
    ("log(div(1, W))", "-log(W)", "log_recip"),
    ("div(W, W) * G + W", "W + G", "cancel"),
    ("div(mul(W, X), W) + W", "W + X", "cancel"),
    ("div(mul(W, G), mul(W, X)) * W", "W*G/X", "cancel"),
    ("div(sqr(W), W)", "W", "cancel"),
    ("mms(add(mul(2, G), 3)) * W", "W*mms(G)", "norm_affine"),
    ("mms(neg(G)) * W", "W*(1 - mms(G))", "norm_affine"),
    ("sqr(sub(W, mms(neg(N))))", "sqr(W)", "norm_const"),
    ("add(W, zsn_row(rowsum(G)))", "W", "norm_const"),
    ("zsn(mul(-3, G)) * W", "-W*zsn(G)", "norm_affine"),
    ("zsn(mms(G)) * W", "W*zsn(G)", "norm_norm"),
    ("mms(zsn(G)) * W", "W*mms(G)", "norm_norm"),
    ("mms(mms(G)) * W", "W*mms(G)", "norm_norm"),
    ("mms_row(mms(G)) * W", "W*mms_row(G)", "norm_norm"),
    ("zsn_row(mms_row(G)) * W", "W*zsn_row(G)", "norm_norm"),
    ("sqrt(sqr(W))", "abs(W)", None),
    ("sqr(sqrt(W))", "abs(W)", None),
    ("neg(neg(W))", "W", None),
    ("abs(abs(W))", "abs(W)", None),
    ("abs(mul(W, X))", "abs(W)*X", None),
    ("abs(mms(W))", "mms(W)", None),
    ("sub(W, W) + G * W", "W*G", None),
    ("mul(W, 1)", "W", None),
    ("add(W, 0)", "W", None),
    ("mul(W, W)", "sqr(W)", None),
]


@pytest.mark.parametrize("text, expected, rule", CASES)
def test_rule_fires_and_keeps_the_value(text, expected, rule):
    m = Metric.parse(text)
    s = m.simplify()
    assert str(s) == expected
    if rule is not None:
        assert s.rules[rule] >= 1
    p = primitives(dtype=torch.float64)
    before = interpret(parse(text), p, dtype=torch.float64)
    after = s.compile()(**p, dtype=torch.float64)
    assert torch.allclose(before, after, rtol=1e-9, atol=1e-12)


def test_every_rule_is_covered():
    covered = {rule for _, _, rule in CASES if rule}
    assert covered == {r.name for r in RULES}


def test_rules_do_not_fire_where_they_would_change_meaning():
    # mms over a row-wise normaliser is not an affine map of the whole matrix
    assert str(Metric.parse("mms(mms_row(G)) * W").simplify()) == "W*mms(mms_row(G))"
    # a sum in a denominator does not cancel against one of its terms
    assert str(Metric.parse("div(G, add(G, X)) * W").simplify()) == "W*G/(G + X)"
    # exp(log(x)) is |x|, not x
    assert str(Metric.parse("exp(log(W))").simplify()) != "W"


def test_simplify_reaches_a_fixed_point():
    e = to_sympy(parse("exp(log(exp(log(div(1, div(1, W))))))"))
    counts = Counter()
    s = simplify(e, counts)
    assert simplify(s) == s
    assert counts["exp_log"] == 2 and counts["recip_recip"] == 1
