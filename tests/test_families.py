"""Every model family users prune, on tiny random models built here: the block walk equals
the model's own forward, apply (Wanda, SparseGPT, a G metric) prunes exactly the requested
fraction of every prunable layer and nothing else, the sequence (BOS) protocol, and darwin
shrinks the families it accepts exactly and refuses the rest before any work."""
import pytest
import torch

from prunerzero import apply_metric, apply_sparsegpt
from prunerzero.engine.blocks import block_inputs
from prunerzero.engine.passes import run_block
from prunerzero.engine.calibration import compute_g
from prunerzero.engine.layers import matrix
from prunerzero.engine.models import ModelError, all_prunable, decoder_layers, skipped_layers

from families import DARWIN_FAMILIES, FAMILIES, tiny
from helpers import layer_inputs
from tiny import token_samples

SAMPLES = token_samples(4, 32)


def own_block_outputs(model, samples):
    """Each decoder block's output inside the model's own forward, per sample."""
    outs = {i: [] for i in range(len(decoder_layers(model)))}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: outs[i].append(o[0] if isinstance(o, tuple) else o))
             for i, b in enumerate(decoder_layers(model))]
    with torch.no_grad():
        for s in samples:
            model(s[None], use_cache=False)
    for h in hooks:
        h.remove()
    return outs


@pytest.mark.parametrize("family", FAMILIES)
def test_the_block_walk_reproduces_the_models_own_forward_at_every_block(family):
    model = tiny(family)
    own = own_block_outputs(model, SAMPLES)
    inputs, calls = block_inputs(model, SAMPLES)
    with torch.no_grad():
        for i, block in enumerate(decoder_layers(model)):
            inputs = run_block(block, inputs, calls[i])
            for got, want in zip(inputs, own[i]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{family} block {i}")


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_block_calls_give_each_samples_own_output_and_statistics(family):
    # accelerators run several calibration samples per block call: the one-sample call
    # arguments (masks, rotary tables) must broadcast so that nothing mixes across samples
    from prunerzero.engine.blocks import blockwise
    from prunerzero.engine.calibration import Hessians
    model = tiny(family)
    inputs, calls = block_inputs(model, SAMPLES)
    with torch.no_grad():
        for i, block in enumerate(decoder_layers(model)):
            one = run_block(block, inputs, calls[i], batch=1)
            three = run_block(block, inputs, calls[i], batch=3)  # 4 samples: a full call and a short one
            assert len(three) == len(one) == len(SAMPLES)
            for a, b in zip(three, one):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{family} block {i}")
            inputs = one
    stats = {}
    for batch in (1, 4):
        seen = stats[batch] = {}
        blockwise(tiny(family), SAMPLES, Hessians, lambda i, lin, rec: seen.update(
            {f"{i}.{k}": v.clone() for k, v in rec.H.items()}), progress=False, dense=True, batch=batch)
    assert stats[1].keys() == stats[4].keys() and stats[1]
    for name, H in stats[1].items():
        torch.testing.assert_close(stats[4][name], H, rtol=1e-4, atol=1e-4, msg=f"{family} {name}")


def test_gemma3_blocks_get_their_own_rotary_tables():
    # the regression the walk fixes: sliding and global layers are called with different RoPE
    _, calls = block_inputs(tiny("gemma3"), SAMPLES)
    kinds = tiny("gemma3").config.layer_types
    cos = [c[1]["position_embeddings"][0] for c in calls]
    first_global = kinds.index("full_attention")
    assert not torch.equal(cos[0], cos[first_global])


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _prunable_storage(model):
    """data_ptr ranges of the prunable weights (per-expert views point into the 3D tensors)."""
    return {matrix(m).untyped_storage().data_ptr() for m in all_prunable(model).values()}


def _check_only_prunable_changed(model, before):
    storages = _prunable_storage(model)
    for name, p in model.named_parameters():
        if p.untyped_storage().data_ptr() not in storages:
            assert torch.equal(p, before[name]), f"{name} is not prunable but changed"


@pytest.mark.parametrize("family", FAMILIES)
def test_wanda_prunes_exactly_half_of_every_row_of_every_prunable_layer_and_nothing_else(family):
    model = tiny(family)
    before = _snapshot(model)
    report = apply_metric(model, "wanda", 0.5, calibration=SAMPLES, progress=False)
    layers = all_prunable(model)
    assert layers and set(report.layers) == set(layers)
    for name, m in layers.items():
        W = matrix(m)
        assert ((W == 0).sum(1) == W.shape[1] // 2).all(), name
    _check_only_prunable_changed(model, before)
    assert "lm_head" in report.skipped


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsegpt_keeps_the_2of4_pattern_in_every_prunable_layer_and_nothing_else(family):
    model = tiny(family)
    before = _snapshot(model)
    apply_sparsegpt(model, 0.5, "2:4", calibration=SAMPLES, progress=False)
    for name, m in all_prunable(model).items():
        W = matrix(m)
        assert ((W == 0).reshape(W.shape[0], -1, 4).sum(-1) >= 2).all(), name
        assert (W != 0).sum() > 0.45 * W.numel(), name  # SparseGPT updated, did not wipe, the kept half
    _check_only_prunable_changed(model, before)


def test_conv1d_layers_are_scored_as_out_by_in_matrices():
    # GPT-2 stores (in, out): the mask must compare inputs within each output, as for a Linear
    model, ref = tiny("gpt2"), tiny("gpt2")
    xs = layer_inputs(ref, SAMPLES, all_prunable(ref))
    apply_metric(model, "wanda", 0.5, calibration=SAMPLES, sequential=False, progress=False)
    for name, conv in all_prunable(ref).items():
        W = conv.weight.detach().t()                       # (out, in)
        score = W.abs() * xs[name].norm(dim=0)
        keep = torch.ones_like(W, dtype=torch.bool).scatter_(1, torch.argsort(score, 1)[:, :W.shape[1] // 2], False)
        assert torch.equal(all_prunable(model)[name].weight.t() != 0, keep & (W != 0)), name


@pytest.mark.parametrize("family", ["gpt2", "mixtral"])
def test_g_is_the_per_sample_gradient_norm_in_out_by_in_layout(family):
    model = tiny(family)
    G = compute_g(model, SAMPLES[:2])
    name, m = next((n, m) for n, m in all_prunable(model).items() if ("experts" in n) == (family == "mixtral"))
    grads = []
    with torch.enable_grad():
        for s in SAMPLES[:2]:
            w = m.weight
            w.requires_grad_(True)
            w.grad = None
            model(input_ids=s[None], labels=s[None]).loss.backward()
            grads.append(matrix_of_grad(m))
            w.requires_grad_(False)
    torch.testing.assert_close(G[name], torch.stack(grads).norm(dim=0), rtol=1e-4, atol=1e-9)
    assert G[name].shape == matrix(m).shape


def matrix_of_grad(m):
    from prunerzero.engine.layers import as_matrix
    return as_matrix(m, m.weight.grad).clone()


def test_moe_experts_are_pruned_one_by_one_and_routers_never():
    model = tiny("mixtral")
    before = _snapshot(model)
    report = apply_metric(model, "wanda", 0.5, calibration=SAMPLES, progress=False)
    experts = model.model.layers[0].mlp.experts
    for e in range(experts.gate_up_proj.shape[0]):  # the 3D tensors themselves hold the zeros
        assert ((experts.gate_up_proj[e] == 0).sum(1) == 32).all()
        assert ((experts.down_proj[e] == 0).sum(1) == 64).all()
    assert torch.equal(model.model.layers[0].mlp.gate.weight, before["model.layers.0.mlp.gate.weight"])
    assert report.skipped["layers.0.mlp.gate"] == "MoE router/gate"
    assert "layers.0.mlp.experts.3.down_proj" in report.layers
    moe = tiny("qwen2_moe")
    r = apply_metric(moe, "wanda", 0.5, calibration=SAMPLES, progress=False)
    assert "layers.0.mlp.shared_expert_gate" in r.skipped and "layers.0.mlp.shared_expert.up_proj" in r.layers


def test_pruned_conv1d_and_moe_models_save_and_reload_with_their_zeros(tmp_path):
    from transformers import AutoModelForCausalLM
    for family in ("gpt2", "mixtral"):
        model = tiny(family)
        apply_metric(model, "magnitude", 0.5, group="row", progress=False)
        model.save_pretrained(tmp_path / family)
        back = AutoModelForCausalLM.from_pretrained(tmp_path / family)
        assert set(back.state_dict()) == set(model.state_dict())
        for name, p in back.named_parameters():
            torch.testing.assert_close(p, dict(model.named_parameters())[name])
        assert all(float((matrix(m) == 0).float().mean()) == 0.5 for m in all_prunable(back).values())


def test_a_model_with_nothing_to_prune_is_an_error_before_any_work():
    model = tiny("llama")
    for block in decoder_layers(model):
        block.self_attn, block.mlp = torch.nn.Identity(), torch.nn.Identity()
    with pytest.raises(ModelError, match="nothing would be pruned"):
        apply_metric(model, "wanda", 0.5, calibration=SAMPLES, progress=False)
    with pytest.raises(ModelError, match="nothing would be pruned"):
        apply_sparsegpt(model, 0.5, calibration=SAMPLES, progress=False)
    assert "lm_head" in skipped_layers(model)


def test_an_expert_that_saw_no_token_is_pruned_by_magnitude_not_wiped():
    from prunerzero.engine.reconstruct import inverse_factor
    from prunerzero.engine.sparsegpt import sparsegpt_weights
    W = torch.randn(8, 16)
    U, dead = inverse_factor(torch.zeros(16, 16))
    out = sparsegpt_weights(W, U, dead, 0.5, None, blocksize=16)
    assert (out == 0).sum() == 64 and torch.equal(out != 0, W.abs() >= W.abs().flatten().kthvalue(65).values)


@pytest.mark.parametrize("family", DARWIN_FAMILIES)
def test_darwin_shrinks_each_family_it_accepts_to_the_masked_models_function(family, tmp_path):
    import copy
    import random
    from prunerzero.structured.database import build_database
    from prunerzero.structured.genome import LevelSpace
    from prunerzero.structured.shrink import apply_masked, load_structured, materialize, save_structured
    from prunerzero.structured.units import check_supported
    model = tiny(family)
    check_supported(model)
    db = build_database(model, token_samples(8, 32), tmp_path / "db", {"family": family}, progress=False)
    space = LevelSpace.of_database(db)
    rng = random.Random(0)
    genomes = [space.mutate(space.uniform(0.6), rng, switches=3) for _ in range(3)]
    genomes.append(tuple([4, 1, 0, 2] + [2, 0, 10, 5]))  # no attention in block 0 (generation reads
    # its cache for the positions), a single head, no MLP
    x = token_samples(2, 32, seed=7)
    for g in genomes:
        small = materialize(model, db, g)
        masked = apply_masked(copy.deepcopy(model), db, g)  # the family's own attention, units zeroed
        with torch.no_grad():
            torch.testing.assert_close(small(x).logits, masked(x).logits, rtol=1e-4, atol=1e-5)
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    save_structured(small, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(load_structured(tmp_path / "m")(x).logits, small(x).logits)
    # stock transformers loads the saved folder through its modeling file, and generates with a
    # KV cache the same greedy tokens as the full-size masked model (the family's own attention)
    from transformers import AutoModelForCausalLM
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True)
    assert stock.config.use_cache and type(stock).__name__ == "PrunerZeroForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(stock(x).logits, small(x).logits, rtol=0, atol=0)
    prompt = x[:1, :8]
    greedy = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(stock.generate(prompt, **greedy), masked.generate(prompt, **greedy))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in DARWIN_FAMILIES])
def test_darwin_refuses_the_other_families_clearly_before_any_work(family, tmp_path):
    from click.testing import CliRunner
    from prunerzero.cli import main
    from prunerzero.structured.units import StructureError, check_supported
    model = tiny(family)
    with pytest.raises(StructureError, match="cannot shrink .* Supported: Llama, Mistral, Qwen2, Qwen3"):
        check_supported(model)
    if family == "gpt2":  # and through the command line: exit 2, one line, before any data is used
        model.save_pretrained(tmp_path / "m")
        from tiny import word_tokenizer
        word_tokenizer(False).save_pretrained(tmp_path / "m")
        (tmp_path / "short.txt").write_text("far too short to draw calibration windows from")
        r = CliRunner().invoke(main, ["darwin", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "run"),
                                      "--calibration", str(tmp_path / "short.txt")])
        assert r.exit_code == 2 and "cannot shrink GPT2LMHeadModel" in r.output, r.output


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "phi3"])
def test_batched_g_equals_the_per_sample_definition(family):
    # accelerators run G with several samples per backward and per-sample products in hooks
    model = tiny(family)
    if not all(type(m) is torch.nn.Linear for m in all_prunable(model).values()):
        pytest.skip("per-expert or Conv1D weights take the per-sample path whatever the batch")
    samples = token_samples(5, 24)
    one = compute_g(model, samples, scale=3.0, batch=1)
    two = compute_g(model, samples, scale=3.0, batch=2)  # 5 samples: two full batches and one short
    assert one.keys() == two.keys() and one
    for name, g in one.items():
        torch.testing.assert_close(two[name], g, rtol=1e-4, atol=1e-6, msg=f"{family} {name}")
    assert all(p.grad is None for p in model.parameters())
