"""Perplexity one decoder block at a time, and the search's per-block candidate evaluation
(issue 18: a 7B candidate must not need a whole-model copy of its masks and weights):
the same figures and fingerprints as the whole-model paths, on every family."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from prunerzero.engine.calibration import compute_x
from prunerzero.engine.evaluate import nll_blockwise, nll_sum
from prunerzero.engine.layers import matrix
from prunerzero.engine.models import all_prunable, copy_fits, decoder_layers
from prunerzero.search.evaluator import DENSE, Evaluator, Setup, Task, fingerprint, packed, unpacked

from families import FAMILIES, VOCAB, tiny
from tiny import token_samples, tiny_llama


def chunks(n=3, seqlen=32):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_capturing_the_block_inputs_runs_no_block(family):
    # a 7B model in host memory (or bf16 on a CPU) once ran whole here before the block walk
    from prunerzero.engine.blocks import block_inputs
    model = tiny(family)
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in all_prunable(model).values()]
    inputs, args = block_inputs(model, chunks())
    for h in hooks:
        h.remove()
    assert calls == [] and len(inputs) == 3 and len(args) == len(decoder_layers(model))
    assert all("forward" not in b.__dict__ for b in decoder_layers(model))  # the blocks' own forwards back


@pytest.mark.parametrize("family", FAMILIES)
def test_blockwise_perplexity_equals_the_whole_model_bit_for_bit(family):
    model = tiny(family)
    ids = chunks()
    assert nll_blockwise(model, ids, progress=False) == nll_sum(model, ids, batch_size=1, progress=False)


def test_blockwise_perplexity_restores_every_block_forward():
    model = tiny("llama")
    nll_blockwise(model, chunks(), progress=False)
    assert all("forward" not in b.__dict__ for b in decoder_layers(model))
    assert nll_sum(model, chunks(), progress=False)[1] == 3 * 31


def test_packed_masks_round_trip_and_keep_the_fingerprint():
    g = torch.Generator().manual_seed(1)
    masks = {"a": torch.rand(7, 13, generator=g) < 0.5, "b": torch.rand(5, 3, generator=g) < 0.3}
    for m in masks.values():
        assert torch.equal(unpacked(packed(m), torch.empty(m.shape)), m)
    assert fingerprint(masks) == fingerprint({k: masks[k] for k in reversed(list(masks))})


@pytest.mark.parametrize("shape", [(7, 13), (4, 8), (1, 1), (3, 5, 2)])
def test_masks_packed_on_an_accelerator_are_numpys_bytes(shape):
    # GPU masks are packed and unpacked with torch where they are; same bytes, same fingerprints
    from prunerzero.search.evaluator import packed_in_torch, unpacked_in_torch
    m = torch.rand(shape, generator=torch.Generator().manual_seed(2)) < 0.4
    bits = packed_in_torch(m)
    assert bits.dtype == torch.uint8 and np.array_equal(bits.numpy(), np.packbits(m.numpy()))
    assert torch.equal(unpacked_in_torch(bits, m), m)


def evaluator(tmp_path, per_block, batch_size=1, structure="unstructured"):
    model = tiny_llama(layers=3)
    samples = token_samples(4, 32)
    path = tmp_path / "X.safetensors"
    save_file({k: v.contiguous() for k, v in compute_x(model, samples).items()}, str(path))
    setup = Setup(model=None, primitives={"X": str(path)}, nsamples=4, sparsity=0.5, structure=structure,
                  chunks={"search": token_samples(3, 32, seed=5)}, batch_size=batch_size, per_block=per_block)
    return Evaluator(setup, model=model)


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_per_block_candidates_match_the_whole_model_copy(tmp_path, structure):
    whole, per_block = evaluator(tmp_path, False, structure=structure), evaluator(tmp_path, True, structure=structure)
    assert not whole.per_block and per_block.per_block
    found = {}
    for text in ("abs(W)*X", "W**2", DENSE):
        a, b = whole(Task(text, 0, 3)), per_block(Task(text, 0, 3))
        assert a.error is None and b.error is None
        assert a.fingerprint == b.fingerprint and (a.nll, a.tokens) == (b.nll, b.tokens), text
        found[text] = a
    assert len({r.fingerprint for r in found.values()}) == 3 and found[DENSE].nll != found["W**2"].nll
    # a known fingerprint is not evaluated again
    assert per_block(Task("abs(W)*X", 0, 3, known={found["abs(W)*X"].fingerprint: 3})).cached


def recipe_evaluator(tmp_path, per_block, structure):
    from prunerzero.engine.calibration import compute_hessians
    ev = evaluator(tmp_path, per_block, structure=structure)
    path = tmp_path / "H.safetensors"
    save_file({k: v.contiguous() for k, v in compute_hessians(ev.model, token_samples(4, 32), progress=False).items()},
              str(path))
    ev.setup.hessians, ev.setup.update = str(path), dict(kind="admm", iters=6, gradual=3)
    return Evaluator(ev.setup, model=ev.model)


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_per_block_recipe_candidates_match_the_whole_model_copy(tmp_path, structure):
    """A reconstructed candidate per block (layers made one at a time into host memory, each
    block swapped in while it runs): the whole path's fingerprint and NLL, the model restored."""
    whole, per_block = recipe_evaluator(tmp_path, False, structure), recipe_evaluator(tmp_path, True, structure)
    dense = {n: w.clone() for n, w in per_block.dense.items()}
    for text in ("abs(W)*X", "W**2"):
        a, b = whole(Task(text, 0, 3, reconstruct=True)), per_block(Task(text, 0, 3, reconstruct=True))
        mask_only = per_block(Task(text, 0, 3))
        assert a.error is None and b.error is None
        assert a.fingerprint == b.fingerprint and (a.nll, a.tokens) == (b.nll, b.tokens), text
        assert b.fingerprint != mask_only.fingerprint and b.nll != mask_only.nll
    assert all(torch.equal(matrix(lin), dense[n]) for n, lin in all_prunable(per_block.model).items())


def test_per_block_pruning_touches_one_block_at_a_time_and_restores_it(tmp_path):
    ev = evaluator(tmp_path, True)
    dense = {n: w.clone() for n, w in ev.dense.items()}
    blocks = decoder_layers(ev.model)
    seen = []

    def check(block, args, kwargs):  # while block i runs, it alone differs from the dense model
        i = [b is block for b in blocks].index(True)
        changed = {n.split(".")[1] for n, lin in all_prunable(ev.model).items() if not torch.equal(matrix(lin), dense[n])}
        seen.append((i, changed))
    hooks = [b.register_forward_pre_hook(check, with_kwargs=True) for b in blocks]
    try:
        r = ev(Task("abs(W)*X", 0, 3))
    finally:
        for h in hooks:
            h.remove()
    assert r.error is None
    pruned_runs = [(i, c) for i, c in seen if c]
    assert pruned_runs and all(c == {str(i)} for i, c in pruned_runs)
    assert {i for i, _ in pruned_runs} == set(range(len(blocks)))
    assert all(torch.equal(matrix(lin), dense[n]) for n, lin in all_prunable(ev.model).items())


def test_per_block_is_chosen_when_the_copy_would_not_fit(monkeypatch):
    layers = list(all_prunable(tiny_llama()).values())
    assert copy_fits(layers)
    monkeypatch.setattr("prunerzero.engine.models.free_memory", lambda device: 1000)
    assert not copy_fits(layers)
    monkeypatch.setattr("prunerzero.engine.models.free_memory", lambda device: None)
    assert copy_fits(layers)


def test_batched_whole_model_and_per_block_agree_within_float_tolerance(tmp_path):
    a = evaluator(tmp_path, False, batch_size=4)(Task("abs(W)*X", 0, 3))
    b = evaluator(tmp_path, True)(Task("abs(W)*X", 0, 3))
    assert a.fingerprint == b.fingerprint
    np.testing.assert_allclose(a.nll, b.nll, rtol=1e-5)


def test_token_nll_in_slices_equals_one_fp32_cross_entropy():
    import torch.nn.functional as F
    from prunerzero.engine.evaluate import token_nll
    g = torch.Generator().manual_seed(2)
    logits, ids = torch.randn(3, 20, 50, generator=g).bfloat16(), torch.randint(0, 50, (3, 20), generator=g)
    whole = float(F.cross_entropy(logits[:, :-1].float().reshape(-1, 50), ids[:, 1:].reshape(-1), reduction="sum"))
    assert token_nll(logits, ids, slice_tokens=7) == pytest.approx(whole, rel=1e-6)
    assert token_nll(logits, ids) == pytest.approx(whole, rel=1e-6)
