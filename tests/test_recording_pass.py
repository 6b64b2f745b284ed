"""The sequential walk's recording pass only feeds its hooks (its outputs are dropped), so it
stops at the block's last layer before computing it: the same statistics, one matrix product
fewer per block. Checked against the whole pass on every family, and by counting the last
layer's calls."""
import pytest
import torch

from prunerzero.engine import blocks, stages
from prunerzero.engine.layers import matrix
from prunerzero.engine.models import all_prunable, decoder_layers
from prunerzero.engine.prune import apply_metric
from prunerzero.engine.reconstruct import Update

from families import FAMILIES, tiny
from tiny import tiny_llama, token_samples


def pruned(model, update, monkeypatch=None, whole=False):
    if whole:   # the pass run to the end, as before the stop
        monkeypatch.setattr(blocks, "last_layer", lambda *a, **k: [])
    apply_metric(model, "wanda", 0.5, calibration=token_samples(n=4, seqlen=32), update=update, progress=False)
    return {n: matrix(m).clone() for n, m in all_prunable(model).items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_stopping_the_recording_pass_at_the_last_layer_prunes_every_family_alike(family, monkeypatch):
    update = Update("admm", iters=4, gradual=2, correct=0.5)
    stopped = pruned(tiny(family), update)
    whole = pruned(tiny(family), update, monkeypatch, whole=True)
    for name in whole:
        torch.testing.assert_close(stopped[name], whole[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("update", [Update(), Update("obs"), Update("admm", iters=4, gradual=2, correct=0.3)],
                         ids=["mask", "obs", "paired"])
def test_the_last_layer_runs_only_in_the_pass_that_feeds_the_next_block(update, monkeypatch):
    counts = {}
    for whole in (False, True):
        model = tiny_llama(layers=3)
        calls = []
        decoder_layers(model)[1].mlp.down_proj.register_forward_hook(lambda m, a, o: calls.append(len(a[0])))
        pruned(model, update, monkeypatch, whole)
        counts[whole] = len(calls)
    # four windows: the whole recording pass runs down_proj on each of them once more
    assert counts[True] - counts[False] == 4


@pytest.mark.parametrize("correct", [0.0, 0.3])
def test_a_staged_walk_skips_the_last_layer_in_its_last_stage_pass(correct, monkeypatch):
    from prunerzero.engine.stages import _final
    monkeypatch.setattr(stages, "LOCKSTEP_BYTES", 0)   # a pass per stage (the lockstep walk has none to stop)
    update = Update("admm", iters=4, gradual=2, correct=correct, staged=1)
    calls = []
    model = tiny_llama(layers=3)
    decoder_layers(model)[1].mlp.down_proj.register_forward_hook(lambda m, a, o: calls.append(len(a[0])))
    stopped = pruned(model, update)
    monkeypatch.setattr(stages, "_final", lambda *a: None)   # every stage's pass run to its end
    runs = len(calls)
    calls.clear()
    model = tiny_llama(layers=3)
    decoder_layers(model)[1].mlp.down_proj.register_forward_hook(lambda m, a, o: calls.append(len(a[0])))
    whole = pruned(model, update)
    # the down stage's pass over four windows; with correction the dense stream's halves are
    # replayed from its one pass through the block (stages.run_storing), so they add none
    assert len(calls) - runs == 4
    for name in whole:
        torch.testing.assert_close(stopped[name], whole[name], rtol=0, atol=0, msg=name)
    assert _final(["a", "b"], 2) == "b" and _final(["a", "b", "a"], 2) is None and _final(["x.0.w"], 1) is None
    assert _final([], 0) is None   # a block with nothing to prune: no stop


def test_where_the_pass_stops_no_stop_after_an_expert_nor_where_a_layer_runs_twice():
    from prunerzero.engine.models import prunable_linears
    for family, want in (("llama", "mlp.down_proj"), ("opt", "fc2"), ("mixtral", None)):
        model = tiny(family)
        block = decoder_layers(model)[0]
        linears = prunable_linears(block)
        inputs, calls = blocks.block_inputs(model, token_samples(n=1, seqlen=16))
        stop = stages.last_layer(block, linears, inputs[0], calls[0], {})
        assert stop == ([] if want is None else [linears[want]]), family
    twice = {}
    block = decoder_layers(tiny("llama"))[0]
    linears = prunable_linears(block)
    inputs, calls = blocks.block_inputs(tiny("llama"), token_samples(n=1, seqlen=16))
    block.mlp.down_proj.register_forward_hook(lambda m, a, o: block.self_attn.o_proj(a[0][..., :64]))
    assert stages.last_layer(block, linears, inputs[0], calls[0], twice) == []
