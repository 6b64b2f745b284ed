"""The pruning engine on a tiny random Llama: masks, modes, primitives, perplexity."""
import math

import pytest
import torch

from prunerzero import DegenerateMetricError
from prunerzero.engine.calibration import compute_g, compute_x
from prunerzero.engine.evaluate import perplexity
from prunerzero.engine.models import all_prunable
from prunerzero.engine.prune import apply_metric

from helpers import layer_inputs
from tiny import tiny_llama, token_samples


def test_wanda_one_shot_equals_a_straightforward_computation():
    model, ref = tiny_llama(), tiny_llama()
    samples = token_samples()
    # independent: hook every Linear, sum x^2 over tokens, |W| * sqrt(sum), prune lowest half per row
    sq = {n: (x ** 2).sum(0) for n, x in layer_inputs(ref, samples, all_prunable(ref)).items()}
    apply_metric(model, "wanda", 0.5, calibration=samples, sequential=False, progress=False)
    for name, lin in all_prunable(ref).items():
        score = lin.weight.abs() * sq[name].sqrt()
        keep = torch.ones_like(score, dtype=torch.bool)
        for r in range(score.shape[0]):
            keep[r, torch.argsort(score[r])[: score.shape[1] // 2]] = False
        assert torch.equal(all_prunable(model)[name].weight != 0, keep & (lin.weight != 0)), name


@pytest.mark.parametrize("structure, n, m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_nm_structure_is_exact_in_every_layer(structure, n, m):
    model = tiny_llama()
    report = apply_metric(model, "magnitude", structure=structure, calibration=token_samples(), progress=False)
    for lin in all_prunable(model).values():
        zeros = (lin.weight == 0).reshape(lin.weight.shape[0], -1, m).sum(-1)
        assert (zeros == n).all()
    assert report.sparsity == pytest.approx(n / m)


def test_unstructured_sparsity_is_exact_per_row():
    model = tiny_llama()
    report = apply_metric(model, "wanda", 0.3, calibration=token_samples(), progress=False)
    for name, lin in all_prunable(model).items():
        assert ((lin.weight == 0).sum(1) == int(lin.in_features * 0.3)).all()
        assert report.layers[name] == pytest.approx(int(lin.in_features * 0.3) / lin.in_features)


@pytest.mark.parametrize("metric", ["wanda", "sqr(W)*H"])  # X from input norms; X and H from Hessians
def test_sequential_and_one_shot_differ_only_after_the_first_block(metric):
    samples = token_samples()
    seq, one = tiny_llama(), tiny_llama()
    apply_metric(seq, metric, 0.5, calibration=samples, sequential=True, progress=False)
    apply_metric(one, metric, 0.5, calibration=samples, sequential=False, progress=False)
    a, b = all_prunable(seq), all_prunable(one)
    first = [k for k in a if k.startswith("layers.0.")]
    later = [k for k in a if not k.startswith("layers.0.")]
    # both modes record block 0's X in one dense pass; later blocks see pruned inputs only sequentially
    assert first and all(torch.equal(a[k].weight, b[k].weight) for k in first)
    assert any(not torch.equal(a[k].weight, b[k].weight) for k in later)


def test_magnitude_needs_no_calibration_and_metric_with_g_uses_gradients():
    model = tiny_llama()
    apply_metric(model, "magnitude", 0.5, sequential=False, progress=False)
    model = tiny_llama()
    samples = token_samples()
    G = compute_g(model, samples)
    assert all((g >= 0).all() and g.shape == lin.weight.shape for g, lin in zip(G.values(), all_prunable(model).values()))
    # G equals the l2 norm of per-sample gradients computed directly for one layer
    name, lin = next(iter(all_prunable(model).items()))
    per = []
    for s in samples:
        model.zero_grad()
        model(input_ids=s[None], labels=s[None]).loss.backward()
        per.append(lin.weight.grad.clone())
    model.zero_grad()
    assert torch.allclose(G[name], torch.stack(per).norm(dim=0), rtol=1e-4, atol=1e-9)
    apply_metric(model, "pruner-zero", 0.5, calibration=samples, grads=G, sequential=False, progress=False)


def test_x_norms_match_a_direct_computation():
    model, samples = tiny_llama(), token_samples()
    X = compute_x(model, samples)
    lin = all_prunable(model)["layers.1.mlp.down_proj"]
    got = []
    h = lin.register_forward_hook(lambda m, i, o: got.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        model(samples)
    h.remove()
    assert torch.allclose(X["layers.1.mlp.down_proj"][0], torch.cat(got).norm(dim=0), rtol=1e-5)


def test_non_finite_metric_fails_clearly():
    with pytest.raises(DegenerateMetricError, match="layers.0"):
        apply_metric(tiny_llama(), "exp(1e6*W)*exp(1e6*W)*exp(1e6*W)*W", 0.5, sequential=False, progress=False)


def test_perplexity_matches_direct_nll():
    model, chunks = tiny_llama(), token_samples(3, 16)
    with torch.no_grad():
        logits = model(chunks).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), chunks[:, 1:].reshape(-1))
    assert perplexity(model, chunks, batch_size=2, progress=False) == pytest.approx(math.exp(nll.item()), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_prune_exactly_and_stay_in_their_dtype(dtype):
    from prunerzero import apply_sparsegpt
    samples = token_samples()
    for prune in (lambda m: apply_metric(m, "pruner-zero", 0.5, calibration=samples, progress=False),
                  lambda m: apply_sparsegpt(m, 0.5, "2:4", calibration=samples, progress=False)):
        model = tiny_llama().to(dtype)
        report = prune(model)
        assert all(lin.weight.dtype == dtype for lin in all_prunable(model).values())
        assert report.sparsity == pytest.approx(0.5, abs=1e-3)
        assert math.isfinite(perplexity(model, samples, batch_size=2))


def test_h_terminal_is_the_obs_curvature_and_equals_x_squared_for_uncorrelated_inputs():
    from prunerzero.engine.calibration import compute_h, obs_curvature
    torch.manual_seed(0)
    # uncorrelated channels (diagonal X^T X): H = X^2 up to the damping
    X = torch.diag(torch.rand(16) + 0.5) * 10
    H = X.T @ X
    expected = H.diagonal() + 0.01 * H.diagonal().mean()
    torch.testing.assert_close(obs_curvature(H)[0], expected)
    # correlated: a duplicated channel can stand in for its twin, so its curvature drops far below X^2
    x = torch.randn(500, 8)
    x[:, 1] = x[:, 0]
    c = obs_curvature(x.T @ x)[0]
    assert c[0] < 0.1 * (x[:, 0] ** 2).sum() and c[2] > 0.5 * (x[:, 2] ** 2).sum()
    # whole model, one-shot: one (1, in) row per layer; the metric prunes exactly
    model, samples = tiny_llama(), token_samples()
    curv = compute_h(model, samples)
    assert all(curv[n].shape == (1, lin.in_features) for n, lin in all_prunable(model).items())
    report = apply_metric(model, "sqr(W)*H", 0.5, calibration=samples, sequential=False, curvature=curv,
                          progress=False)
    assert report.sparsity == pytest.approx(0.5)


def test_magnitude_uses_its_published_layer_wide_threshold_unless_told_otherwise():
    model = tiny_llama()
    report = apply_metric(model, "magnitude", 0.5, progress=False)
    assert report.group == "layer" and not report.sequential
    per_row = [(lin.weight == 0).sum(1) for lin in all_prunable(model).values()]
    assert all(int(z.sum()) == lin.weight.numel() // 2 for z, lin in zip(per_row, all_prunable(model).values()))
    assert any(len(set(z.tolist())) > 1 for z in per_row)  # rows differ: one threshold per layer
    row = tiny_llama()
    assert apply_metric(row, "magnitude", 0.5, group="row", progress=False).group == "row"
    assert all(((lin.weight == 0).sum(1) == lin.in_features // 2).all() for lin in all_prunable(row).values())
