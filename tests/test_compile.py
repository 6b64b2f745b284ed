"""Compilation to torch: shapes, dtypes, primitives, caching and score checks."""
import pytest
import torch

from prunerzero import DegenerateMetricError, Metric, NonFiniteScoreError
from prunerzero.language.compile import check_scores



def test_wanda_scores_equal_the_direct_formula(prims):
    W, X = prims["W"].float(), prims["X"].float()
    assert torch.equal(Metric.parse("wanda").compile()(W, X=X), W.abs() * X)


def test_published_pruner_zero_metric_matches_its_definition(prims):
    W, G = prims["W"].float(), prims["G"].float()
    mms = (G - G.min()) / (G.max() - G.min())
    expected = (W.abs() * W.abs()).abs() * mms
    assert torch.allclose(Metric.parse("pruner-zero").compile()(W, G=G), expected, rtol=1e-6)


def test_scores_are_fp32_and_shaped_like_w_whatever_the_input_dtype(prims):
    W = prims["W"].to(torch.bfloat16)
    s = Metric.parse("ria").compile()(W, X=prims["X"].half())
    assert s.dtype == torch.float32 and s.shape == W.shape


def test_x_may_be_given_flat_and_scalars_as_numbers(prims):
    X = prims["X"].reshape(-1)
    a = Metric.parse("gblm").compile()(prims["W"], G=prims["G"], X=X, N=32)
    b = Metric.parse("gblm").compile()(prims["W"], G=prims["G"], X=X.reshape(1, -1), N=torch.tensor(32))
    assert torch.equal(a, b)


def test_missing_or_misshapen_primitives_are_reported(prims):
    c = Metric.parse("pruner-zero").compile()
    with pytest.raises(ValueError, match="uses the primitive G"):
        c(prims["W"])
    with pytest.raises(ValueError, match="shape"):
        c(prims["W"], G=prims["G"][:, :3])


def test_compilation_is_cached_per_simplified_form():
    a = Metric.parse("exp(log(abs(W))) * X").compile()
    b = Metric.parse("mul(abs(W), X)").compile()
    assert a is b


def test_source_is_vectorised_torch():
    src = Metric.parse("ria").compile().source
    assert "ops.rowsum" in src and "for " not in src


@pytest.mark.parametrize("text, error", [
    ("exp(1000*W) * exp(1000*W) * exp(1000*W)", NonFiniteScoreError),   # overflows fp32
    ("mms_row(W) * 0 + rowsum(W) + W - W", DegenerateMetricError),
])
def test_bad_scores_raise_a_catchable_error(text, error, prims):
    try:
        m = Metric.parse(text)
    except DegenerateMetricError:
        assert error is DegenerateMetricError   # caught statically: fine
        return
    with pytest.raises(error):
        m.compile()(**prims, check=True)


def test_check_scores_flags_constant_rows():
    check_scores(torch.tensor([[1.0, 2.0], [3.0, 3.0]]))  # one varying row is enough
    with pytest.raises(DegenerateMetricError):
        check_scores(torch.tensor([[1.0, 1.0], [3.0, 3.0]]))
    with pytest.raises(NonFiniteScoreError):
        check_scores(torch.tensor([[1.0, float("nan")]]))
