"""Fitting the dense model's output (Update.correct=1.0): each layer's weights move first to the
damped least-squares fit of the dense output from the inputs it now receives, then any solver
runs unchanged. Checked against the closed form, against the layer's own fit when nothing
before it was pruned, and end to end on tiny models of every family."""
import pytest
import torch

from prunerzero.engine.calibration import PairedHessians
from prunerzero.engine.prune import apply_metric
from prunerzero.engine.reconstruct import Update, dense_fitter, reconstruct
from prunerzero.errors import PrunerZeroError

from families import FAMILIES, tiny
from tiny import tiny_llama, token_samples


def streams(out=12, inp=16, tokens=300, seed=0, noise=0.3):
    """W, the dense inputs Xd and the inputs X a pruned model gives the layer (Xd plus an error)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g, dtype=torch.float64) / inp ** 0.5 + torch.eye(inp, dtype=torch.float64)
    Xd = torch.randn(tokens, inp, generator=g, dtype=torch.float64) @ mix
    X = Xd + noise * torch.randn(tokens, inp, generator=g, dtype=torch.float64)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    return W, X, Xd


@pytest.mark.parametrize("kind", ["obs", "admm"])
def test_the_fit_is_the_closed_form_damped_least_squares_solve(kind):
    W, X, Xd = streams()
    update = Update(kind, correct=1.0)
    H, K = X.T @ X, X.T @ Xd
    got = dense_fitter(H.float(), K.float(), update)(W.float()).double()
    # the damping each solver uses: OBS percdamp * mean diag H, ADMM its unit-diagonal damping
    d = H.diagonal()
    damp = update.damping * (d if update.is_admm else d.mean().expand_as(d))
    # min ||X V^T - Xd W^T||^2 + sum_j damp_j ||V_:j - W_:j||^2, as one stacked least-squares problem
    A = torch.cat([X, torch.diag(damp.sqrt())])
    B = torch.cat([Xd @ W.T, torch.diag(damp.sqrt()) @ W.T])
    want = torch.linalg.lstsq(A, B).solution.T
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # a share c of the correction: the weights move linearly from W (c = 0) to the full fit
    half = dense_fitter(H.float(), K.float(), Update(kind, correct=0.25))(W.float()).double()
    torch.testing.assert_close(half, W + 0.25 * (want - W), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["obs", "admm"])
def test_with_no_earlier_error_the_fit_leaves_the_weights_as_they_are(kind):
    W, _, Xd = streams()
    H = (Xd.T @ Xd).float()
    torch.testing.assert_close(dense_fitter(H, H, Update(kind, correct=1.0))(W.float()), W.float(), rtol=1e-4,
                               atol=1e-4)


def test_on_a_fixed_mask_admm_from_the_fit_reaches_the_masked_solve_against_the_dense_output():
    """Run to convergence on a fixed mask, ADMM started from the fit solves each row's masked
    least squares against the dense output, and so beats the layer's own fit there."""
    W, X, Xd = streams(noise=0.5)
    H, K = (X.T @ X).float(), (X.T @ Xd).float()
    fixed = torch.rand(W.shape, generator=torch.Generator().manual_seed(1))
    update = Update("admm", gradual=0, iters=500, percdamp=1e-6, correct=1.0)
    errors = {}
    for fit in ("layer", "dense"):
        start = W.float() if fit == "layer" else dense_fitter(H, K, update)(W.float())
        V = reconstruct(start, H, update, lambda w: fixed, 0.5).double()
        errors[fit] = float((X @ V.T - Xd @ W.T).pow(2).sum())
    kept = V != 0
    for r in range(len(W)):
        direct = torch.linalg.lstsq(X[:, kept[r]], Xd @ W[r]).solution
        torch.testing.assert_close(V[r, kept[r]], direct, rtol=2e-3, atol=2e-3)
    assert errors["dense"] < errors["layer"]


def test_the_paired_recorder_meets_each_dense_input_with_its_pruned_one():
    lin = torch.nn.Linear(8, 4)
    x, xd = torch.randn(10, 8), torch.randn(10, 8)
    with PairedHessians({"a": lin}) as rec:
        rec.capturing = True
        lin(xd)
        rec.capturing = False
        lin(x)
    torch.testing.assert_close(rec.H["a"], x.T @ x)
    torch.testing.assert_close(rec.cross("a"), x.T @ xd)
    with PairedHessians({"a": lin}) as rec:   # another token count (routing differed): no pairing
        rec.capturing = True
        lin(xd[:7])
        rec.capturing = False
        lin(x)
    assert rec.cross("a") is None and "a" in rec.unpaired



def test_a_dense_input_the_pruned_stream_never_met_is_not_paired_with_a_later_batch():
    """An MoE expert the dense stream routes batch 0's tokens to and the pruned stream does not:
    batch 1's pruned input must not meet batch 0's dense one (same shape, other tokens)."""
    lin = torch.nn.Linear(8, 4)
    x, xd = torch.randn(10, 8), torch.randn(10, 8)
    with PairedHessians({"a": lin}) as rec:
        rec.capture()
        lin(xd)                 # batch 0: the dense stream reaches the layer ...
        rec.capturing = False   # ... the pruned stream does not
        rec.capture()           # batch 1: the dense stream does not reach it ...
        rec.capturing = False
        lin(x)                  # ... the pruned one does
        rec.settle()
    assert rec.cross("a") is None and "a" in rec.unpaired
    with PairedHessians({"a": lin}) as rec:   # the last batch's dense input, never met
        rec.capture()
        lin(xd)
        rec.capturing = False
        rec.settle()
    assert rec.cross("a") is None and "a" in rec.unpaired


def test_the_first_block_is_pruned_as_the_layer_fit_prunes_it_and_the_model_ends_closer_to_the_dense_one():
    from prunerzero.engine.layers import matrix
    from prunerzero.engine.models import all_prunable
    samples = token_samples(n=8, seqlen=32)
    with torch.no_grad():
        want = tiny_llama(layers=3)(samples).logits
    models, errors = {}, {}
    for fit in ("layer", "dense"):
        model = models[fit] = tiny_llama(layers=3)
        update = Update("admm", correct=1.0 if fit == "dense" else 0.0)
        report = apply_metric(model, "wanda", 0.5, "2:4", calibration=samples, update=update, progress=False)
        assert report.sparsity == pytest.approx(0.5)
        assert report.update.get("correct", 0.0) == update.correct
        with torch.no_grad():
            errors[fit] = float((model(samples).logits - want).pow(2).mean())
    layers = {f: all_prunable(m) for f, m in models.items()}
    for name in layers["layer"]:
        a, b = matrix(layers["layer"][name]), matrix(layers["dense"][name])
        if name.startswith("layers.0."):   # nothing pruned before it: the same fit
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
        elif name.startswith("layers.2."):
            assert not torch.allclose(a, b, rtol=1e-3, atol=1e-4), name
    assert errors["dense"] < errors["layer"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_exactly_with_error_correction(family):
    model = tiny(family)
    report = apply_metric(model, "wanda", 0.5, "2:4", calibration=token_samples(n=4, seqlen=32),
                          update=Update("admm", iters=4, gradual=2, correct=0.5), progress=False)
    assert 0.5 <= report.sparsity < 0.52 and report.update["correct"] == 0.5   # OPT: dead inputs too
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_error_correction_needs_an_update_and_a_share_between_0_and_1():
    with pytest.raises(PrunerZeroError, match="--update"):
        Update("none", correct=1.0)
    for bad in (-0.1, 1.5):
        with pytest.raises(PrunerZeroError, match="correct"):
            Update("admm", correct=bad)
    assert Update.parse("admm correct=0.2").correct == 0.2
