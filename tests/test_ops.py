"""Each operator's single definition, including its protection."""
import math

import pytest
import sympy
import torch

from prunerzero.language import ops
from prunerzero.language.space import load_space
from prunerzero.language.symbolic import apply_operator, symbols

t = torch.tensor


def test_every_operator_of_the_space_is_defined_in_torch_and_sympy():
    syms = symbols()
    for name, op in load_space().operators.items():
        assert callable(getattr(ops, name)), name
        form = apply_operator(name, [syms["W"], syms["X"]][: op.arity])
        assert form.free_symbols, name


def test_arithmetic():
    a, b = t([1.0, -2.0]), t([3.0, 4.0])
    assert torch.equal(ops.add(a, b), t([4.0, 2.0]))
    assert torch.equal(ops.sub(a, b), t([-2.0, -6.0]))
    assert torch.equal(ops.mul(a, b), t([3.0, -8.0]))
    assert torch.allclose(ops.div(a, b), t([1 / 3, -0.5]))
    assert torch.equal(ops.neg(a), t([-1.0, 2.0]))
    assert torch.equal(ops.sqr(a), t([1.0, 4.0]))
    assert torch.equal(ops.abs(a), t([1.0, 2.0]))


def test_div_is_protected_and_keeps_the_sign():
    q = ops.div(t([1.0, 1.0, 1.0]), t([0.0, -1e-35, 1e-35]))
    assert torch.isfinite(q).all()
    assert q.tolist() == pytest.approx([1 / ops.EPS, -1 / ops.EPS, 1 / ops.EPS], rel=1e-6)
    assert torch.equal(ops.div(t([2.0]), t([0.5])), t([4.0]))
    assert torch.equal(ops.div(t([3.0]), t([7.0])), ops.mul(t([3.0]), ops.recip(t([7.0]))))


def test_log_sqrt_exp_are_protected():
    assert ops.log(t([0.0])).item() == pytest.approx(math.log(ops.EPS))
    assert ops.log(t([-math.e])).item() == pytest.approx(1.0)
    assert ops.sqrt(t([-4.0])).item() == 2.0
    assert torch.isfinite(ops.exp(t([1e4])))
    assert ops.exp(t([1e4])).item() == pytest.approx(math.exp(ops.EXP_MAX), rel=1e-6)
    assert ops.tanh(t([0.5])).item() == pytest.approx(math.tanh(0.5))
    assert ops.sigmoid(t([0.0])).item() == 0.5


def test_whole_matrix_normalisers():
    a = torch.randn(5, 7, dtype=torch.float64)
    m = ops.mms(a)
    assert m.min() == 0 and m.max() == 1
    z = ops.zsn(a)
    assert z.mean().abs() < 1e-12 and (z.std(correction=0) - 1).abs() < 1e-12
    assert torch.equal(ops.mms(torch.full((3, 4), 2.0)), torch.zeros(3, 4))
    assert torch.equal(ops.zsn(torch.full((3, 4), 2.0)), torch.zeros(3, 4))
    # a (1, in) column normalises exactly like its broadcast matrix
    col = torch.rand(1, 6, dtype=torch.float64)
    assert torch.allclose(ops.zsn(col).expand(4, 6), ops.zsn(col.expand(4, 6)))


def test_row_normalisers():
    a = torch.randn(5, 7, dtype=torch.float64)
    m = ops.mms_row(a)
    assert torch.equal(m.amin(-1), torch.zeros(5)) and torch.allclose(m.amax(-1), torch.ones(5, dtype=torch.float64))
    z = ops.zsn_row(a)
    assert torch.allclose(z.mean(-1), torch.zeros(5, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("shape_a", [(4, 6), (1, 6), (4, 1), ()])
def test_row_and_column_sums_follow_broadcasting(shape_a):
    shape = (4, 6)
    a = torch.rand(shape_a, dtype=torch.float64) if shape_a else torch.tensor(0.7, dtype=torch.float64)
    full = a.expand(shape)
    assert torch.allclose(ops.rowsum(a, shape).expand(4, 1), full.sum(-1, keepdim=True))
    assert torch.allclose(ops.colsum(a, shape).expand(1, 6), full.sum(0, keepdim=True))


def test_numbers_fold_through_the_same_definitions():
    syms = symbols()
    assert float(apply_operator("log", [sympy.Integer(0)])) == math.log(ops.EPS)
    assert apply_operator("div", [sympy.Integer(1), sympy.Integer(4)]) == sympy.Rational(1, 4)
    assert apply_operator("mms", [sympy.Integer(3)]) == 0
    assert apply_operator("exp", [sympy.Integer(0)]) == 1
    assert apply_operator("rowsum", [sympy.Integer(2)]).has(sympy.Integer(2))  # shape-dependent: kept
    assert apply_operator("sqrt", [syms["W"] ** 2]) == sympy.Abs(syms["W"])
