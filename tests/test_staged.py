"""Staged pruning within a block (Update.staged=1, SparseGPT's "true sequential"): a block's
layers are pruned in forward order, each stage's statistics recorded on the inputs that the
block's already-pruned stages give it. Checked: the stages of every family, the recorded
Hessians against a hand-made pass through a block pruned up to that stage, the paired (dense)
stream against the dense block, and exact sparsity end to end on every family."""
import copy

import pytest
import torch

from prunerzero.engine.blocks import block_inputs, blockwise
from prunerzero.engine.stages import layer_stages
from prunerzero.engine.calibration import Hessians, PairedHessians
from prunerzero.engine.layers import matrix
from prunerzero.engine.models import decoder_layers, prunable_linears
from prunerzero.engine.prune import apply_metric
from prunerzero.engine.reconstruct import Update
from prunerzero.errors import PrunerZeroError

from families import FAMILIES, tiny
from tiny import tiny_llama, token_samples

LLAMA_STAGES = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_prunable_layer_is_in_exactly_one_stage_in_forward_order(family):
    model = tiny(family)
    inputs, calls = block_inputs(model, token_samples(n=2, seqlen=32))
    block = decoder_layers(model)[0]
    linears = prunable_linears(block)
    stages, order = layer_stages(block, linears, inputs[0], calls[0])
    assert set(order) <= set(linears)
    names = [n for s in stages for n in s]
    assert sorted(names) == sorted(linears) and len(names) == len(set(names))
    assert len(stages) >= 4                      # attention in, attention out, MLP in, MLP out at least
    first = stages[0]
    assert all("attn" in n for n in first), stages
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        assert stages == LLAMA_STAGES


def halve_by_magnitude(linears):
    for lin in linears.values():
        W = matrix(lin)
        keep = W.abs() >= W.abs().median(dim=1, keepdim=True).values
        W.mul_(keep)


def hessian_of(layer, block, x, call):
    """X^T X of `layer`'s inputs when `block` runs on x."""
    seen = []
    h = layer.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        block(x, *call[0], **call[1])
    h.remove()
    X = torch.cat(seen).float()
    return X.T @ X


def test_each_stage_records_its_inputs_with_the_earlier_stages_pruned():
    model = tiny_llama(layers=2)
    samples = token_samples(n=3, seqlen=32)
    reference = copy.deepcopy(model)
    inputs, calls = block_inputs(reference, samples)
    block0 = decoder_layers(reference)[0]
    ref_linears = prunable_linears(block0)
    want = {}
    for stage in LLAMA_STAGES:      # by hand: prune stage by stage, the Hessian of each before it is pruned
        H = sum(hessian_of(ref_linears[stage[0]], block0, x, calls[0]) for x in inputs)
        want[stage[0]] = H
        halve_by_magnitude({n: ref_linears[n] for n in stage})
    got, parts = {}, []

    def prune_block(i, linears, rec):
        if i == 0:
            parts.append(sorted(linears))
            got.update({n: rec.H[n] for n in rec.H})
        halve_by_magnitude(linears)
    blockwise(model, samples, Hessians, prune_block, progress=False, staged=True)
    assert parts == [sorted(s) for s in LLAMA_STAGES]
    for name, H in want.items():
        torch.testing.assert_close(got[name], H, rtol=1e-4, atol=1e-3)
    # o_proj's inputs did change once q/k/v were pruned: the staged walk is not the plain one
    plain = {}
    blockwise(copy.deepcopy(tiny_llama(layers=2)), samples, Hessians,
              lambda i, lin, rec: plain.update(rec.H) if i == 0 else None, progress=False)
    assert not torch.allclose(plain["self_attn.o_proj"], got["self_attn.o_proj"], rtol=1e-3)
    # block 0 ends as the hand-pruned one
    for (n, a), b in zip(prunable_linears(decoder_layers(model)[0]).items(), ref_linears.values()):
        torch.testing.assert_close(matrix(a), matrix(b), msg=n)


def test_the_dense_stream_runs_on_the_dense_weights_of_the_stages_already_pruned():
    """Paired (error correction): each stage's K = X^T Xd meets its pruned inputs with the dense
    block's, however many stages were pruned before it; the weights are the pruned ones after."""
    model = tiny_llama(layers=2)
    samples = token_samples(n=3, seqlen=32)
    dense = copy.deepcopy(model)
    inputs, calls = block_inputs(dense, samples)
    dense_block = decoder_layers(dense)[0]
    got, after = {}, {}

    def prune_block(i, linears, rec):
        if i == 0:
            got.update({n: (rec.H[n].clone(), rec.cross(n).clone()) for n in rec.H})
        halve_by_magnitude(linears)
        if i == 0:
            after.update({n: matrix(lin).clone() for n, lin in linears.items()})
    blockwise(model, samples, PairedHessians, prune_block, progress=False, paired=True, staged=True)
    pruned_block = decoder_layers(model)[0]
    name = "mlp.down_proj"      # the last stage: every earlier one pruned
    seen = {"d": [], "p": []}
    hooks = [prunable_linears(dense_block)[name].register_forward_hook(
                 lambda m, i, o: seen["d"].append(i[0].reshape(-1, i[0].shape[-1]))),
             prunable_linears(pruned_block)[name].register_forward_hook(
                 lambda m, i, o: seen["p"].append(i[0].reshape(-1, i[0].shape[-1])))]
    with torch.no_grad():
        # the pruned block's down_proj input does not depend on down_proj itself
        for x in inputs:
            dense_block(x, *calls[0][0], **calls[0][1])
            pruned_block(x, *calls[0][0], **calls[0][1])
    for h in hooks:
        h.remove()
    Xd, X = torch.cat(seen["d"]), torch.cat(seen["p"])
    H, K = got[name]
    torch.testing.assert_close(H, X.T @ X, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(K, X.T @ Xd, rtol=1e-4, atol=1e-3)
    for n, lin in prunable_linears(pruned_block).items():   # the swaps left the pruned weights in place
        assert torch.equal(matrix(lin), after[n]), n


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_exactly_in_stages(family):
    model = tiny(family)
    update = Update("admm", iters=4, gradual=2, staged=1, correct=0.2 if family in ("llama", "mixtral") else 0.0)
    report = apply_metric(model, "wanda", 0.5, "2:4", calibration=token_samples(n=4, seqlen=32),
                          update=update, progress=False)
    assert 0.5 <= report.sparsity < 0.52 and report.update["staged"] == 1   # OPT: dead inputs too
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_staged_works_with_any_update_and_is_written_in_the_spec():
    assert Update.parse("admm staged=1").spec() == "admm staged=1"
    assert Update("none", staged=1).describe() == {"kind": "none", "staged": 1}
    model = tiny_llama(layers=2)
    report = apply_metric(model, "wanda", 0.5, calibration=token_samples(n=3, seqlen=32),
                          update=Update("obs", staged=1), progress=False)
    assert report.update["staged"] == 1 and report.sparsity == pytest.approx(0.5)
    with pytest.raises(PrunerZeroError, match="staged"):
        Update("admm", staged=2)


def staged_walk(family, monkeypatch, store: bool, lockstep: bool, paired: bool = True, batch=None, dense_windows=0):
    """A staged walk on tiny(family) with the dense store and the lockstep walk allowed or not:
    each stage's H (and K), the final weights, and how many layer calls block 0 made.
    dense_windows: the dense stream carried for that many of the 3 samples (0: all)."""
    from prunerzero.engine import stages
    monkeypatch.setattr(stages, "DENSE_STORE_BYTES", (2 << 30) * store)
    monkeypatch.setattr(stages, "LOCKSTEP_BYTES", (2 << 30) * lockstep)
    model = tiny(family)
    seen, calls = {}, []
    for m in prunable_linears(decoder_layers(model)[0]).values():
        m.register_forward_pre_hook(lambda mod, a: calls.append(1))

    def prune_block(i, linears, rec):
        for n in rec.H:
            K = rec.cross(n) if paired else None
            seen[i, n] = (rec.H[n].clone(), None if K is None else K.clone())
        halve_by_magnitude(linears)
    blockwise(model, token_samples(n=3, seqlen=16), PairedHessians if paired else Hessians, prune_block,
              progress=False, paired=paired, staged=True, batch=batch, dense_windows=dense_windows)
    return seen, torch.cat([p.detach().flatten() for p in model.parameters()]), len(calls)


def assert_same_walk(got, want):
    (seen, weights, _), (seen0, weights0, _) = got, want
    assert seen.keys() == seen0.keys() and len(seen) > 4
    for key, (H, K) in seen0.items():
        torch.testing.assert_close(seen[key][0], H, rtol=1e-4, atol=1e-4, msg=str(key))
        assert (K is None) == (seen[key][1] is None), key
        if K is not None:
            torch.testing.assert_close(seen[key][1], K, rtol=1e-4, atol=1e-4, msg=str(key))
    torch.testing.assert_close(weights, weights0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_stored_dense_inputs_replay_each_stage_as_its_own_dense_pass_would(family, monkeypatch):
    """Paired and staged: each stage's dense half replayed from the one dense pass that passes
    the dense stream on (stages.run_storing) records the same H and K, stage by stage and block
    by block, as running it on the dense weights swapped in (what a block over
    DENSE_STORE_BYTES still does), and the models end alike."""
    replayed = staged_walk(family, monkeypatch, store=True, lockstep=False)
    passes = staged_walk(family, monkeypatch, store=False, lockstep=False)
    assert_same_walk(replayed, passes)
    assert replayed[2] < passes[2]   # the dense stages' passes are gone


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("paired", [True, False])
def test_the_lockstep_walk_prunes_each_stage_as_the_passes_would(family, paired, monkeypatch):
    """One pass of the pruned stream, every batch halted before each stage (stages.prune_in_lockstep):
    the same H and K at every stage and the same weights as a pass per stage, with fewer layer
    calls where the block qualifies (MoE blocks do not: their experts run by the tokens)."""
    lockstep = staged_walk(family, monkeypatch, store=True, lockstep=True, paired=paired)
    passes = staged_walk(family, monkeypatch, store=True, lockstep=False, paired=paired)
    assert_same_walk(lockstep, passes)
    if family in ("mixtral", "qwen2_moe"):
        assert lockstep[2] == passes[2]
    else:
        assert lockstep[2] < passes[2]


def test_the_lockstep_walk_takes_batches_and_is_bit_for_bit_repeatable(monkeypatch):
    """Several samples a call (as on a GPU): the same as one a call; and two runs give identical
    weights, though the threads take their turns in any order (the stage statistics are summed
    in batch order)."""
    one = staged_walk("llama", monkeypatch, store=True, lockstep=True)
    two = staged_walk("llama", monkeypatch, store=True, lockstep=True, batch=2)
    assert_same_walk(two, one)
    again = staged_walk("llama", monkeypatch, store=True, lockstep=True)
    assert torch.equal(again[1], one[1])


def test_a_lockstep_walk_over_its_budget_runs_the_passes(monkeypatch):
    from prunerzero.engine import stages
    used = []
    real = stages.prune_in_lockstep
    monkeypatch.setattr(stages, "prune_in_lockstep", lambda *a, **k: used.append(1) or real(*a, **k))
    staged_walk("llama", monkeypatch, store=True, lockstep=True)
    assert len(used) == len(decoder_layers(tiny("llama")))     # every block
    monkeypatch.setattr(stages, "LOCKSTEP_BYTES", 1000)
    model = tiny_llama(layers=2)
    blockwise(model, token_samples(n=3, seqlen=16), Hessians, lambda i, lin, rec: halve_by_magnitude(lin),
              progress=False, staged=True)
    assert len(used) == len(decoder_layers(tiny("llama")))     # none more


def test_the_dense_inputs_are_not_stored_past_the_budget():
    from prunerzero.engine.passes import run_block
    from prunerzero.engine.stages import run_storing
    model = tiny_llama(layers=1)
    inputs, calls = block_inputs(model, token_samples(n=4, seqlen=16))
    block = decoder_layers(model)[0]
    linears = prunable_linears(block)
    outs, stored = run_storing(block, linears, inputs, calls[0], 1)
    want = run_block(block, inputs, calls[0], 1)
    assert all(torch.equal(a, b) for a, b in zip(outs, want))
    assert len(stored) == 4 and [n for n, _ in stored[0]] == list(linears)   # forward order, every layer
    assert stored[0][0][1] is stored[0][1][1]             # q/k/v read one tensor, kept once
    outs, stored = run_storing(block, linears, inputs, calls[0], 1, budget=1000)
    assert stored is None and all(torch.equal(a, b) for a, b in zip(outs, want))


def test_an_error_while_a_stage_is_pruned_in_lockstep_reaches_the_caller():
    import threading
    model = tiny_llama(layers=2)
    ours = lambda: [t for t in threading.enumerate() if t.name.startswith("Thread-")]  # noqa: E731
    before = len(ours())

    def prune_block(i, linears, rec):
        if "mlp.up_proj" in linears:
            raise ValueError("NaN scores in block 0's gate/up")
        halve_by_magnitude(linears)
    with pytest.raises(ValueError, match="NaN scores"):
        blockwise(model, token_samples(n=4, seqlen=16), Hessians, prune_block, progress=False, staged=True)
    assert len(ours()) == before, threading.enumerate()      # no thread left waiting at a stop
