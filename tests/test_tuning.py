"""Block tuning (`--update "... tune=E"`): each pruned block's kept weights tuned together
towards the dense block's outputs, on tiny random models of every family."""
import pytest
import torch

from prunerzero.checks import SettingsError
from prunerzero.engine.blocks import block_inputs
from prunerzero.engine.layers import matrix
from prunerzero.engine.models import all_prunable, decoder_layers, prunable_linears
from prunerzero.engine.passes import run_block
from prunerzero.engine.prune import apply_metric
from prunerzero.engine.reconstruct import Update
from prunerzero.engine.tuning import relative_error, tune_block

from families import FAMILIES, tiny
from tiny import tiny_llama, token_samples

CAL = token_samples(n=6, seqlen=32)


def zeros(model) -> dict:
    return {n: matrix(lin) == 0 for n, lin in all_prunable(model).items()}


def logit_error(model, dense) -> float:
    with torch.no_grad():
        return float((model(CAL).logits - dense(CAL).logits).pow(2).mean())


def test_tuning_a_block_lowers_its_error_and_moves_only_kept_weights():
    dense = tiny_llama(layers=1)
    pruned = tiny_llama(layers=1)
    apply_metric(pruned, "wanda", 0.5, calibration=CAL, update="admm", progress=False)
    inputs, calls = block_inputs(dense, CAL)
    block, dense_block = decoder_layers(pruned)[0], decoder_layers(dense)[0]
    with torch.no_grad():
        targets = run_block(dense_block, inputs, calls[0])
    linears = prunable_linears(block)
    before = {n: matrix(m).clone() for n, m in linears.items()}
    first = tune_block(block, linears, inputs, targets, calls[0], epochs=3, lr=1e-3)
    last = relative_error(block, inputs, targets, calls[0])
    assert last < 0.8 * first
    for n, m in linears.items():
        pruned_here = before[n] == 0
        assert torch.equal(matrix(m) == 0, pruned_here), n          # the mask is the mask
        assert not torch.equal(matrix(m)[~pruned_here], before[n][~pruned_here]), n


@pytest.mark.parametrize("update", ["admm", "admm staged=1", "admm correct=0.2", "admm correct=0.2 staged=1", "none"])
def test_a_tuned_prune_is_closer_to_the_dense_model_with_the_same_sparsity(update):
    dense = tiny_llama(layers=2)
    plain, tuned = tiny_llama(layers=2), tiny_llama(layers=2)
    apply_metric(plain, "wanda", 0.5, calibration=CAL, update=update, progress=False)
    report = apply_metric(tuned, "wanda", 0.5, calibration=CAL, update=f"{update} tune=2 tune_lr=1e-3",
                          progress=False)
    assert report.update["tune"] == 2 and report.update["tune_lr"] == 1e-3
    assert logit_error(tuned, dense) < logit_error(plain, dense)
    for n, z in zeros(tuned).items():   # every layer at exactly its own count (rows of 50%)
        assert int(z.sum()) == z.numel() // 2, n


def test_one_shot_pruning_tunes_against_the_dense_outputs_too():
    dense = tiny_llama(layers=2)
    plain, tuned = tiny_llama(layers=2), tiny_llama(layers=2)
    apply_metric(plain, "wanda", 0.5, calibration=CAL, update="admm", sequential=False, progress=False)
    apply_metric(tuned, "wanda", 0.5, calibration=CAL, update="admm tune=2 tune_lr=1e-3", sequential=False,
                 progress=False)
    assert logit_error(tuned, dense) < logit_error(plain, dense)


def test_a_half_precision_model_is_tuned_in_fp32_and_keeps_its_dtype():
    model = tiny_llama(layers=2).to(torch.bfloat16)
    untuned = tiny_llama(layers=2).to(torch.bfloat16)
    apply_metric(untuned, "wanda", 0.5, calibration=CAL, update="admm", progress=False)
    apply_metric(model, "wanda", 0.5, calibration=CAL, update="admm tune=1 tune_lr=1e-3", progress=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert any(not torch.equal(matrix(a), matrix(b)) for a, b in zip(all_prunable(model).values(),
                                                                      all_prunable(untuned).values()))
    for n, z in zeros(model).items():
        assert int(z.sum()) == z.numel() // 2, n


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_exactly_with_block_tuning(family):
    model = tiny(family)
    report = apply_metric(model, "wanda", 0.5, "2:4", calibration=token_samples(n=3, seqlen=32),
                          update=Update("admm", iters=4, gradual=2, tune=1, tune_lr=1e-3), progress=False)
    assert 0.5 <= report.sparsity < 0.52   # OPT: dead inputs too
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_tuning_repeats_to_the_bit():
    a, b = tiny_llama(layers=2), tiny_llama(layers=2)
    for m in (a, b):
        apply_metric(m, "wanda", 0.5, calibration=CAL, update="admm tune=2 tune_lr=1e-3", progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_tuning_settings_are_checked_and_written_in_the_spec():
    assert Update.parse("admm tune=2 tune_lr=0.0003").spec() == "admm tune=2 tune_lr=0.0003"
    assert Update.parse("admm tune=2 tune_lr=0.001").spec() == "admm tune=2"   # the default rate
    assert "tune" not in Update("admm").describe()
    with pytest.raises(SettingsError, match="tune"):
        Update("admm", tune=-1)
    with pytest.raises(SettingsError, match="--update tune_lr"):
        Update("admm", tune=1, tune_lr=0)
