"""SparseGPT: exact patterns, lower reconstruction error than magnitude at the same budget,
shared Hessians, dead channels, and both pruning modes on a tiny random Llama."""
import pytest
import torch

from prunerzero import apply_sparsegpt
from prunerzero.engine.masks import make_mask
from prunerzero.engine.models import all_prunable, decoder_layers, prunable_linears
from prunerzero.engine.blocks import block_inputs
from prunerzero.engine.passes import run_block
from prunerzero.engine.reconstruct import HessianError, inverse_factor
from prunerzero.engine.sparsegpt import Hessians, sparsegpt_weights

from helpers import layer_inputs
from tiny import tiny_llama, token_samples


def _block0_inputs(model, samples):
    """The inputs of every Linear of block 0, concatenated over samples and tokens."""
    linears = prunable_linears(decoder_layers(model)[0])
    return linears, layer_inputs(model, samples, linears)


@pytest.mark.parametrize("structure", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_reconstructs_better_than_magnitude_on_the_same_budget(structure):
    model = tiny_llama()
    linears, xs = _block0_inputs(model, token_samples(n=8))
    nm = None if structure == "unstructured" else tuple(map(int, structure.split(":")))
    for name, lin in linears.items():
        W, X = lin.weight.detach(), xs[name]
        U, dead = inverse_factor(X.T @ X)
        sparse = sparsegpt_weights(W, U, dead, 0.5, nm, blocksize=32)
        magnitude = W * ~make_mask(W.abs(), 0.5, structure)
        assert (sparse == 0).sum() == (magnitude == 0).sum() == W.numel() // 2, name
        err = lambda V: ((X @ (W - V).T) ** 2).sum()  # noqa: E731
        assert err(sparse) < 0.8 * err(magnitude), name


def test_nm_pattern_is_exact_and_unstructured_count_is_exact_per_block():
    torch.manual_seed(0)
    X, W = torch.randn(256, 64), torch.randn(16, 64)
    U, dead = inverse_factor(X.T @ X)
    two_four = sparsegpt_weights(W, U, dead, 0.5, (2, 4), blocksize=16)
    assert ((two_four == 0).reshape(16, -1, 4).sum(-1) == 2).all()
    unstructured = sparsegpt_weights(W, U, dead, 0.3, None, blocksize=16)
    per_block = (unstructured == 0).reshape(16, 4, 16).sum((0, 2))
    assert (per_block == int(16 * 16 * 0.3)).all()


def test_q_k_v_and_gate_up_share_one_hessian_equal_to_xtx():
    model = tiny_llama()
    linears, xs = _block0_inputs(model, token_samples())
    rec = Hessians(linears)
    with torch.no_grad(), rec:
        for s in token_samples():
            model(s[None])
    H = {n: rec.H[rec.owner[n]] for n in linears}
    assert H["self_attn.q_proj"] is H["self_attn.k_proj"] is H["self_attn.v_proj"]
    assert H["mlp.gate_proj"] is H["mlp.up_proj"]
    assert len(rec.H) == 4
    for n, X in xs.items():
        torch.testing.assert_close(H[n], X.T @ X, rtol=1e-4, atol=1e-4)


def test_dead_input_channels_are_dropped_without_nans():
    torch.manual_seed(0)
    X, W = torch.randn(128, 32), torch.randn(8, 32)
    X[:, 5] = 0
    U, dead = inverse_factor(X.T @ X)
    out = sparsegpt_weights(W, U, dead, 0.5, None, blocksize=16)
    assert dead[5] and dead.sum() == 1
    assert torch.isfinite(out).all() and (out[:, 5] == 0).all()


def test_a_hessian_that_damping_cannot_fix_is_a_clear_error():
    H = torch.full((4, 4), float("nan"))
    with pytest.raises(HessianError, match="positive definite"):
        inverse_factor(H)


def test_sequential_and_one_shot_agree_on_the_first_block_only():
    samples = token_samples()
    seq, one = tiny_llama(), tiny_llama()
    r = apply_sparsegpt(seq, 0.5, calibration=samples, sequential=True, progress=False)
    apply_sparsegpt(one, 0.5, calibration=samples, sequential=False, progress=False)
    a, b = all_prunable(seq), all_prunable(one)
    assert all(torch.allclose(a[k].weight, b[k].weight) for k in a if k.startswith("layers.0."))
    assert any(not torch.allclose(a[k].weight, b[k].weight) for k in a if k.startswith("layers.1."))
    assert r.metric == "sparsegpt" and r.sparsity == pytest.approx(0.5, abs=1e-3)


def test_sparsegpt_lowers_the_block_output_error_against_magnitude():
    samples = token_samples(n=8)
    dense = tiny_llama()
    inputs, calls = block_inputs(dense, samples)
    with torch.no_grad():
        target = run_block(decoder_layers(dense)[0], inputs, calls[0])
    errors = {}
    for method in ("sparsegpt", "magnitude"):
        model = tiny_llama()
        if method == "sparsegpt":
            apply_sparsegpt(model, 0.5, calibration=samples, progress=False)
        else:
            from prunerzero import apply_metric
            apply_metric(model, "magnitude", 0.5, progress=False, sequential=False)
        with torch.no_grad():
            out = run_block(decoder_layers(model)[0], inputs, calls[0])
        errors[method] = sum(((o - t) ** 2).sum() for o, t in zip(out, target))
    assert errors["sparsegpt"] < errors["magnitude"]
