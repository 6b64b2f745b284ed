"""Reconstruction of the kept weights: on random layers with correlated inputs, every update
lowers the layer's output error below mask-only pruning, keeps the requested mask shape, and
ADMM at convergence equals the direct least-squares solve of each row."""
import pytest
import torch

from prunerzero.engine.masks import make_mask
from prunerzero.language.metric import Metric
from prunerzero.engine.prune import apply_metric
from prunerzero.engine.reconstruct import Update, inverse_factor, reconstruct
from prunerzero.engine.sparsegpt import sparsegpt_weights

from tiny import tiny_llama, token_samples


def layer(out=24, inp=32, tokens=400, seed=0):
    """W and H = X^T X of inputs whose channels are correlated (as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    mix = 2 * torch.randn(inp, inp, generator=g, dtype=torch.float64) / inp ** 0.5 + torch.eye(inp, dtype=torch.float64)
    X = torch.randn(tokens, inp, generator=g, dtype=torch.float64) @ mix
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    return W.float(), (X.T @ X).float()


def error(W_new, W, H):
    D = (W_new - W).double()
    return float(torch.einsum("ij,jk,ik->", D, H.double(), D))


def wanda(H):
    x = H.diagonal().sqrt().reshape(1, -1)
    return lambda W: W.abs() * x


def shape_ok(W, sparsity, structure, group="row"):
    zero = W == 0
    if structure == "2:4":
        return bool((zero.reshape(W.shape[0], -1, 4).sum(-1) == 2).all())
    if group == "row":
        return bool((zero.sum(1) == int(W.shape[1] * sparsity)).all())
    return int(zero.sum()) == int(W.numel() * sparsity)


CASES = [(0.5, "unstructured", "row"), (0.6, "unstructured", "layer"), (0.5, "2:4", "row")]


@pytest.mark.parametrize("kind", ["obs", "obs-adaptive", "admm", "admm-pcg"])
@pytest.mark.parametrize("sparsity, structure, group", CASES)
def test_every_update_beats_mask_only_and_keeps_the_mask_shape(kind, sparsity, structure, group):
    W, H = layer()
    score = wanda(H)
    masked = W.masked_fill(make_mask(score(W), sparsity, structure, group), 0)
    new = reconstruct(W, H, Update(kind, blocksize=8), score, sparsity, structure, group)
    assert shape_ok(new, sparsity, structure, group)
    assert error(new, W, H) < error(masked, W, H)


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_obs_keeps_the_metrics_mask_exactly(structure):
    W, H = layer(seed=1)
    score = wanda(H)
    mask = make_mask(score(W), 0.5, structure)
    new = reconstruct(W, H, Update("obs", blocksize=8), score, 0.5, structure)
    assert torch.equal(new == 0, mask)
    assert not torch.equal(new[~mask], W[~mask])  # the kept weights moved


def test_admm_at_convergence_equals_the_direct_least_squares_solve():
    W, H = layer(out=6, inp=16, seed=2)
    score = wanda(H)
    mask = make_mask(score(W), 0.5, "unstructured")
    upd = Update("admm", percdamp=1e-3, rho=0.5, iters=600, gradual=0)
    new = reconstruct(W, H, upd, score, 0.5)
    # the same damped problem solved directly, row by row: H_d = H + percdamp * mean diag(Hn) * diag(H)
    Hd = H.double() + 1e-3 * torch.diag(H.double().diagonal())
    for r in range(W.shape[0]):
        keep = ~mask[r]
        want = torch.linalg.solve(Hd[keep][:, keep], (Hd @ W[r].double())[keep])
        assert torch.allclose(new[r, keep].double(), want, rtol=1e-4, atol=1e-5)
        assert (new[r, ~keep] == 0).all()


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_pcg_refinement_keeps_the_mask_never_raises_the_error_and_converges_to_the_direct_solve(structure):
    from prunerzero.engine.reconstruct import admm_factor, refine_on_mask
    W, H = layer(seed=3)
    score = wanda(H)
    admm = reconstruct(W, H, Update("admm"), score, 0.5, structure)
    kept = (admm != 0).float()
    factor = admm_factor(H, Update("admm-pcg"))
    norm = factor.norm
    # the problem both solve: H damped as ADMM's, H + 0.1 * diag(H) (the unit-diagonal Hessian's
    # mean diagonal being 1)
    Hd = H.double() + 0.1 * torch.diag(H.double().diagonal())
    errors = [error(admm, W, Hd)]
    for steps in range(1, 9):   # each step count from the same start: the error never goes up
        refined = refine_on_mask(admm * norm, W * norm, factor.plain, kept, steps) / norm
        assert torch.equal(refined == 0, admm == 0)
        errors.append(error(refined, W, Hd))
    assert all(b <= a * (1 + 1e-5) for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]
    # run long enough, each row reaches the direct solve of its masked least squares
    done = refine_on_mask(admm * norm, W * norm, factor.plain, kept, 200) / norm
    for r in range(W.shape[0]):
        keep = admm[r] != 0
        want = torch.linalg.solve(Hd[keep][:, keep], (Hd @ W[r].double())[keep])
        assert torch.allclose(done[r, keep].double(), want, rtol=1e-3, atol=1e-3)
    # through reconstruct, with its report entry
    via = reconstruct(W, H, Update("admm-pcg", refine=8), score, 0.5, structure)
    assert torch.equal(via == 0, refined == 0) and torch.allclose(via, refined, rtol=1e-4, atol=1e-5)
    assert Update("admm-pcg").describe()["refine"] == 10 and "refine" not in Update("admm").describe()


def test_adaptive_obs_with_the_obs_saliency_is_sparsegpt_at_2_4():
    """SparseGPT picks each N:M group on the weights its sweep has updated: the adaptive sweep
    with SparseGPT's own saliency must give its weights bit for bit."""
    from prunerzero.engine.reconstruct import obs_sweep
    from prunerzero.engine.masks import nm_mask
    W, H = layer(seed=3)
    U, dead = inverse_factor(H, 0.01)
    ours = obs_sweep(W, U, dead, lambda cur, a, b, d: nm_mask(cur[:, a:b] * cur[:, a:b] / d ** 2, 2, 4), 8, 4)
    assert torch.equal(ours, sparsegpt_weights(W, U, dead, 0.5, (2, 4), blocksize=8))


@pytest.mark.parametrize("update", ["obs", "obs-adaptive", "admm"])
@pytest.mark.parametrize("sequential", [True, False])
def test_apply_metric_with_an_update_prunes_exactly_and_lowers_the_output_error(update, sequential):
    samples = token_samples(n=8)
    dense = tiny_llama()
    with torch.no_grad():
        want = dense(samples).logits
    results = {}
    for kind in ("none", update):
        model = tiny_llama()
        report = apply_metric(model, "wanda", 0.5, "2:4", calibration=samples, sequential=sequential,
                              update=kind, progress=False)
        assert report.sparsity == pytest.approx(0.5) and report.update["kind"] == kind
        with torch.no_grad():
            results[kind] = float((model(samples).logits - want).pow(2).mean())
    assert results[update] < results["none"]


def test_the_report_names_every_parameter_of_the_update():
    model = tiny_llama()
    report = apply_metric(model, Metric.parse("wanda"), 0.5, calibration=token_samples(), update=Update("admm", rho=2.0),
                          progress=False)
    assert report.update == {"kind": "admm", "percdamp": 0.1, "rho": 2.0, "iters": 20, "gradual": 15}


def test_apply_on_the_command_line_reconstructs_and_reports_it(tmp_path):
    import json
    from click.testing import CliRunner
    from prunerzero.cli import main
    from tiny import text, word_tokenizer
    tiny_llama().save_pretrained(tmp_path / "m")
    word_tokenizer(True).save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text("\n".join(text(300, s) for s in range(6)))
    t = str(tmp_path / "t.txt")
    r = CliRunner().invoke(main, ["apply", "--model", str(tmp_path / "m"), "--metric", "wanda", "--structure", "2:4",
                                  "--update", "obs-adaptive", "--calibration", t, "--eval-data", t, "--seqlen", "16",
                                  "--nsamples", "4", "--eval-chunks", "2", "--output", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["update"] == {"kind": "obs-adaptive", "percdamp": 0.01, "blocksize": 128}
    assert report["settings"]["update"] == "obs-adaptive" and report["sparsity"] == 0.5


@pytest.mark.parametrize("method", ["sparsegpt", "admm"])
def test_one_shot_reconstruction_walks_block_by_block_on_the_dense_activations(method):
    """One-shot pruning with an update holds one block's Hessians at a time, yet every layer is
    reconstructed from the dense model's inputs, as from one pass recording all of them."""
    from prunerzero import apply_sparsegpt
    from prunerzero.engine.calibration import Hessians, record_dense
    from prunerzero.engine.layers import matrix
    from prunerzero.engine.models import all_prunable
    samples = token_samples(4, 32, 0)
    dense = tiny_llama(layers=3)
    rec = record_dense(dense, samples, Hessians, progress=False)
    pruned = tiny_llama(layers=3)
    if method == "sparsegpt":
        apply_sparsegpt(pruned, 0.5, calibration=samples, sequential=False, progress=False)
    else:
        apply_metric(pruned, "wanda", 0.5, calibration=samples, sequential=False, update="admm", progress=False)
    x = rec.x_norms()
    for name, lin in all_prunable(pruned).items():
        W, H = matrix(all_prunable(dense)[name]), rec.H[rec.owner[name]]
        if method == "sparsegpt":
            want = sparsegpt_weights(W, *inverse_factor(H), 0.5)
        else:
            want = reconstruct(W, H, Update("admm"), lambda w, name=name: w.abs() * x[name], 0.5)
        assert torch.equal(matrix(lin) == 0, want == 0), name
        torch.testing.assert_close(matrix(lin), want, rtol=1e-4, atol=1e-5)


def textbook_sweep(W, U, choose, blocksize, step):
    """The OBS sweep as written in the SparseGPT paper, with no lazy batching: each column's
    error is subtracted from every later column of its row at once."""
    W = W.clone()
    mask = torch.zeros_like(W, dtype=torch.bool)
    span = step or blocksize
    for i in range(W.shape[1]):
        if i % span == 0:
            j = min(i + span, W.shape[1])
            mask[:, i:j] = choose(W, i, j, U.diagonal()[i:j])
        e = torch.where(mask[:, i], W[:, i], 0) / U[i, i]
        W[:, i:] -= torch.outer(e, U[i, i:])
        W[mask[:, i], i] = 0
    return W


@pytest.mark.parametrize("blocksize, step, inner", [(8, None, 1), (8, None, 3), (16, None, 16), (32, 4, 16), (16, 8, 3)])
def test_the_two_level_obs_sweep_is_the_textbook_sweep(blocksize, step, inner):
    """In fp64 (so that summation order cannot flip a near tie) the batched sweep gives the
    unbatched one's weights, whatever the block and inner run sizes, unstructured and N:M."""
    from prunerzero.engine.masks import layer_mask, nm_mask
    from prunerzero.engine.reconstruct import obs_sweep
    W, H = layer(out=12, inp=48, seed=4)
    W, H = W.double(), H.double()
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H + torch.eye(48, dtype=H.dtype))), upper=True)
    if step:
        choose = lambda cur, a, b, d: nm_mask(cur[:, a:b] ** 2 / d ** 2, step // 2, step)  # noqa: E731
    else:
        choose = lambda cur, a, b, d: layer_mask(cur[:, a:b] ** 2 / d ** 2, 0.5)  # noqa: E731
    want = textbook_sweep(W, U, choose, blocksize, step)
    got = obs_sweep(W, U, torch.zeros(48, dtype=torch.bool), choose, blocksize, step, group_only=True, inner=inner)
    assert got.dtype == torch.float64 and torch.equal(got == 0, want == 0)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sparsity, structure, group", CASES)
def test_bf16_products_while_the_mask_moves_give_the_fp32_error_and_mask_shape(sparsity, structure, group, monkeypatch):
    """bf16=1: the iterations that re-choose the mask multiply in bfloat16, the last iterations and
    the refinement in fp32; the layer's error stays within 1% of all-fp32 ADMM's, the mask keeps
    its shape, and where bf16 is not fast the weights are all-fp32 ADMM's to the bit."""
    import prunerzero.engine.reconstruct as rec
    W, H = layer(out=48, inp=64, tokens=800)
    score = wanda(H)
    exact = reconstruct(W, H, Update.parse("admm-pcg iters=22 gradual=20 refine=5"), score, sparsity, structure, group)
    monkeypatch.setattr(rec, "fast_bf16", lambda device: True)
    coarse = reconstruct(W, H, Update.parse("admm-pcg iters=22 gradual=20 refine=5 bf16=1"), score, sparsity,
                         structure, group)
    assert shape_ok(coarse, sparsity, structure, group)
    assert not torch.equal(coarse, exact)                      # the bf16 products did run
    assert error(coarse, W, H) <= 1.01 * error(exact, W, H)
    monkeypatch.setattr(rec, "fast_bf16", lambda device: False)
    assert torch.equal(reconstruct(W, H, Update.parse("admm-pcg iters=22 gradual=20 refine=5 bf16=1"), score,
                                   sparsity, structure, group), exact)


def test_bf16_is_reported_and_spelled_in_the_spec():
    up = Update.parse("admm-pcg refine=5 bf16=1")
    assert up.describe()["bf16"] == 1 and "bf16=1" in up.spec()
    assert "bf16" not in Update.parse("admm").describe()
    with pytest.raises(Exception, match="bf16"):
        Update.parse("admm bf16=2")
