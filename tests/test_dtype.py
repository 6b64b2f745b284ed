"""--dtype auto keeps a checkpoint's own dtype (a bf16 7B model in half the memory of fp32),
and pruning a half-precision model computes its statistics, scores and masks in fp32."""
import pytest
import torch

from prunerzero import apply_metric
from prunerzero.engine.calibration import compute_x
from prunerzero.checks import DTYPES
from prunerzero.engine.layers import matrix
from prunerzero.engine.models import all_prunable, concrete_dtype, dtype_name
from prunerzero.loading import load_model

from tiny import tiny_llama, token_samples, word_tokenizer


def saved(tmp_path, dtype):
    folder = tmp_path / str(dtype).replace("torch.", "")
    tiny_llama().to(dtype).save_pretrained(folder)
    word_tokenizer(False).save_pretrained(folder)
    return str(folder)


def test_the_cli_offers_the_dtypes_the_settings_accept():
    from prunerzero import cli
    assert cli.DTYPES == DTYPES and DTYPES[0] == "auto"


@pytest.mark.parametrize("dtype, name", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_auto_loads_the_checkpoints_own_dtype(tmp_path, dtype, name):
    folder = saved(tmp_path, dtype)
    assert concrete_dtype(folder, "auto", "cpu") == name
    model, _ = load_model(folder, device="cpu")
    assert next(model.parameters()).dtype == dtype and dtype_name(model) == name
    assert dtype_name(load_model(folder, dtype="fp32", device="cpu")[0]) == "fp32"   # an explicit dtype wins


def test_an_fp16_checkpoint_runs_in_bf16_on_the_cpu(tmp_path):
    folder = saved(tmp_path, torch.float16)
    assert concrete_dtype(folder, "auto", "cpu") == "bf16"
    assert concrete_dtype(folder, "fp16", "cpu") == "fp16"


def test_a_bf16_model_is_scored_in_fp32():
    """The same weights held in bf16 and in fp32, with the same X: identical masks (scores of
    bf16 weights computed in bf16 would round, tie and differ)."""
    half = tiny_llama().to(torch.bfloat16)
    full = tiny_llama().to(torch.bfloat16).float()
    x = compute_x(full, token_samples(4, 32))
    for m in (half, full):
        apply_metric(m, "wanda", 0.5, sequential=False, x_norms=x, progress=False)
    for (name, a), b in zip(all_prunable(half).items(), all_prunable(full).values()):
        assert matrix(a).dtype == torch.bfloat16
        assert torch.equal(matrix(a) == 0, matrix(b) == 0), name


@pytest.mark.parametrize("family", ["llama", "mixtral", "gpt2"])
def test_blocks_upcast_to_fp32_prune_the_stored_half_precision_weights(fp32_blocks, family):
    """Each block runs in fp32 and is stored back in bf16: the pruning lands in the stored
    weights (MoE experts are views of 3D tensors, GPT-2's Conv1D transposed), exactly half of
    every row, and nothing is left in fp32."""
    from families import tiny
    model = tiny(family).to(torch.bfloat16)
    report = apply_metric(model, "wanda", 0.5, calibration=token_samples(4, 32), progress=False)
    assert report.sparsity == pytest.approx(0.5)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for name, lin in all_prunable(model).items():
        W = matrix(lin)
        assert ((W == 0).sum(1) == W.shape[1] // 2).all(), name


def test_upcast_evaluation_is_the_bf16_model_computed_in_fp32(fp32_blocks):
    from prunerzero.engine.evaluate import nll_sum
    half = tiny_llama().to(torch.bfloat16)
    full = tiny_llama().to(torch.bfloat16).float()
    ids = token_samples(3, 32, seed=4)
    a, b = nll_sum(half, ids, progress=False), nll_sum(full, ids, progress=False)
    assert a[1] == b[1] and a[0] == pytest.approx(b[0], rel=2e-3)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
