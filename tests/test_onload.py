"""Block-wise onloading (issue 18): a model kept in host memory runs one decoder block at a
time on the execution device, with the same masks, weights and perplexities as the model
placed whole, and never more than one block moved at a time."""
import pytest
import torch

from prunerzero import apply_metric, apply_sparsegpt
from prunerzero.engine import blocks
from prunerzero.engine.calibration import compute_g, compute_hessians, compute_x
from prunerzero.engine.evaluate import nll_sum
from prunerzero.engine.layers import matrix
from prunerzero.engine.models import ModelError, all_prunable, decoder_layers, place, placement
from prunerzero.loading import load_model

from tiny import token_samples, word_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bf16")
    tiny_llama().to(torch.bfloat16).save_pretrained(path)
    word_tokenizer(False).save_pretrained(path)
    return str(path)


def weights(model):
    return {n: matrix(lin).clone() for n, lin in all_prunable(model).items()}


@pytest.mark.parametrize("prune", ["wanda", "sparsegpt", "staged", "tuned"])
def test_onloaded_and_whole_models_prune_and_score_identically(tiny_dir, prune):
    ids, calib = token_samples(3, 32, seed=5), token_samples(4, 32)
    runs = {}
    for mode in ("never", "always"):
        model, _ = load_model(str(tiny_dir), device="cpu", tokenizer=False, onload=mode)
        if prune == "wanda":
            apply_metric(model, "wanda", 0.5, calibration=calib, progress=False)
        elif prune == "staged":     # staged blocks in lockstep, with the dense stream stored
            apply_metric(model, "wanda", 0.5, calibration=calib, update="admm iters=4 gradual=2 correct=0.2 staged=1",
                         progress=False)
        elif prune == "tuned":      # block tuning, the block's weights tuned where the block runs
            apply_metric(model, "wanda", 0.5, calibration=calib, update="admm iters=4 gradual=2 tune=1",
                         progress=False)
        else:
            apply_sparsegpt(model, 0.5, calibration=calib, progress=False)
        runs[mode] = weights(model), nll_sum(model, ids, batch_size=1, progress=False)
    assert "one block at a time" in placement(model)
    (w_whole, nll_whole), (w_on, nll_on) = runs["never"], runs["always"]
    assert nll_on == nll_whole
    for name in w_whole:
        assert torch.equal(w_whole[name], w_on[name]), name


def test_dense_statistics_are_the_same_walked_block_by_block(tiny_dir):
    calib = token_samples(4, 32)
    whole, _ = load_model(str(tiny_dir), device="cpu", tokenizer=False, onload="never")
    onloaded, _ = load_model(str(tiny_dir), device="cpu", tokenizer=False, onload="always")
    for a, b in ((compute_x(whole, calib), compute_x(onloaded, calib)),
                 (compute_hessians(whole, calib, progress=False), compute_hessians(onloaded, calib, progress=False))):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_at_most_one_block_is_moved_at_a_time(bf16_dir, fp32_blocks, monkeypatch):
    """bf16 weights run in fp32, so every onload really converts the block's tensors: watch the
    model's state at each onload and count the blocks whose weights are not in their stored form."""
    model, _ = load_model(bf16_dir, device="cpu", tokenizer=False, onload="always")
    layers = decoder_layers(model)
    seen, real = [], blocks._onload

    def watched(tensors, device, dtype):
        moved = real(tensors, device, dtype)
        seen.append(sum(any(p.dtype != torch.bfloat16 for p in b.parameters()) for b in layers))
        return moved
    monkeypatch.setattr(blocks, "_onload", watched)
    apply_metric(model, "wanda", 0.5, calibration=token_samples(4, 32), progress=False)
    nll_sum(model, token_samples(2, 32, seed=3), progress=False)
    assert len(seen) >= 2 * len(layers) and max(seen) == 1
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())   # everything back in its own form


def test_moving_a_block_keeps_its_storage(tiny_dir):
    """Offloading puts the values back into the original tensors: views taken before (the search
    evaluator's dense weights) stay valid and nothing is reallocated."""
    model, _ = load_model(str(tiny_dir), device="cpu", tokenizer=False)
    block = decoder_layers(model)[0]
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in block.named_parameters()}
    with blocks.running_in(block, torch.float64, None, write_back=False):
        assert all(p.dtype == torch.float64 for p in block.parameters())
        for p in block.parameters():
            p.data.mul_(3)
    with blocks.running_in(block, torch.float64, None):
        for p in block.parameters():
            p.data.mul_(2)
    for n, p in block.named_parameters():
        assert p.device.type == "cpu" and p.dtype == torch.float32 and p.data_ptr() == before[n][0], n
        assert torch.equal(p, 2 * before[n][1]), n   # written back into the same storage


def test_search_evaluation_per_block_leaves_a_half_precision_model_as_it_was(bf16_dir, fp32_blocks, tmp_path):
    from prunerzero.engine.calibration import cache_path, cached
    from prunerzero.search.evaluator import Evaluator, Setup, Task
    model, _ = load_model(bf16_dir, device="cpu", tokenizer=False, onload="always")
    calib, chunks = token_samples(4, 32), token_samples(3, 32, seed=2)
    settings = dict(test="onload", path=str(tmp_path))
    cached("X", settings, lambda: compute_x(model, calib))
    setup = Setup(model=None, primitives={"X": str(cache_path("X", settings))}, nsamples=4, sparsity=0.5,
                  structure="unstructured", chunks={"search": chunks})
    before = {n: (matrix(lin).data_ptr(), matrix(lin).clone()) for n, lin in all_prunable(model).items()}
    ev = Evaluator(setup, model=model)
    assert ev.per_block
    r = ev(Task("W*X", 0, 3))
    assert r.error is None and r.tokens == 3 * 31
    for n, lin in all_prunable(model).items():
        assert matrix(lin).data_ptr() == before[n][0] and torch.equal(matrix(lin), before[n][1]), n


def test_gradients_need_the_whole_model(tiny_dir):
    model, _ = load_model(str(tiny_dir), device="cpu", tokenizer=False, onload="always")
    with pytest.raises(ModelError, match="onloaded"):
        compute_g(model, token_samples(2, 16))


def test_a_model_too_big_for_the_device_is_onloaded(monkeypatch):
    """auto keeps a model in host memory when the device has too little room (a CUDA device is
    only named here: nothing runs on it), and places it whole when it fits."""
    import prunerzero.engine.models as models
    model = tiny_llama()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(models, "free_memory", lambda device: size)
    assert place(model, torch.device("cuda:1"), "auto") == "onload"
    assert blocks.execution_device(model) == torch.device("cuda:1")
    assert next(model.parameters()).device.type == "cpu" and blocks.compute_dtype(model) is None
    assert place(tiny_llama(), torch.device("cpu"), "auto") == "whole"
    with pytest.raises(ModelError, match="onload mode"):
        place(tiny_llama(), torch.device("cpu"), "sometimes")


def test_per_block_candidates_read_g_a_layer_at_a_time_with_the_same_result(tiny_dir, tmp_path):
    from prunerzero.engine.calibration import cache_path, cached
    from prunerzero.search.evaluator import Evaluator, LazyLayers, Setup, Task
    model, _ = load_model(str(tiny_dir), device="cpu", tokenizer=False)
    calib = token_samples(4, 32)
    files = {}
    for kind, compute in (("G", compute_g), ("X", compute_x)):
        settings = dict(test="lazy", path=str(tmp_path))
        cached(kind, settings, lambda: compute(model, calib))
        files[kind] = str(cache_path(kind, settings))
    results = {}
    for per_block in (False, True):
        setup = Setup(model=None, primitives=files, nsamples=4, sparsity=0.5, structure="unstructured",
                      chunks={"search": token_samples(3, 32, seed=2)}, batch_size=1, per_block=per_block)
        ev = Evaluator(setup, model=model)
        assert isinstance(ev.prims["G"], LazyLayers) == per_block
        r = ev(Task("G*W*X", 0, 3))
        assert r.error is None
        results[per_block] = (r.fingerprint, r.nll, r.tokens)
    assert results[True] == results[False]


def test_g_of_a_half_precision_model_is_kept_in_its_dtype():
    calib = token_samples(2, 16)
    full = compute_g(tiny_llama(), calib)
    half = compute_g(tiny_llama().to(torch.bfloat16), calib)
    assert all(v.dtype == torch.float32 for v in full.values())
    assert all(v.dtype == torch.bfloat16 for v in half.values())
    for k in full:   # the same gradients up to the bf16 model's own rounding
        torch.testing.assert_close(half[k].float(), full[k], rtol=0.1, atol=1e-3)
