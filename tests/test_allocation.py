"""Per-layer sparsity: OWL gives blocks with more outliers fewer pruned weights, and every
allocation prunes exactly int(total * sparsity) weights, with or without reconstruction."""
import pytest
import torch

from prunerzero.engine.allocation import layer_counts, owl_block_sparsities
from prunerzero.checks import SettingsError
from prunerzero.engine.models import all_prunable
from prunerzero.engine.prune import apply_metric

from tiny import tiny_llama, token_samples


def zeros(model) -> int:
    return sum(int((lin.weight == 0).sum()) for lin in all_prunable(model).values())


def total(model) -> int:
    return sum(lin.weight.numel() for lin in all_prunable(model).values())


def test_layer_counts_follow_the_allocation_and_sum_exactly():
    layers = all_prunable(tiny_llama(layers=3))
    wanted = {name: 0.4 + 0.1 * int(name.split(".")[1]) for name in layers}  # 0.4, 0.5, 0.6 by block
    counts = layer_counts(layers, wanted, 0.55)
    assert sum(counts.values()) == int(sum(lin.weight.numel() for lin in layers.values()) * 0.55)
    by_block = [sum(c for n, c in counts.items() if n.startswith(f"layers.{i}.")) for i in range(3)]
    assert by_block[0] < by_block[1] < by_block[2]


def test_owl_spares_the_block_with_outliers_and_keeps_the_mean():
    model = tiny_llama(layers=3)
    with torch.no_grad():  # the last block (whose output feeds no other): a few very large weights
        model.model.layers[2].mlp.down_proj.weight[:, :3] *= 60
    s = owl_block_sparsities(model, token_samples(), 0.6, progress=False)
    assert sum(s) / 3 == pytest.approx(0.6)
    assert min(s) == s[2] and max(s) - min(s) == pytest.approx(0.16)  # the range is 2 * lambda


@pytest.mark.parametrize("update, sequential", [("none", True), ("none", False), ("obs", True),
                                                ("obs-adaptive", True), ("admm", False)])
def test_owl_prunes_exactly_the_total_and_unevenly(update, sequential):
    model = tiny_llama(layers=3)
    report = apply_metric(model, "wanda", 0.7, calibration=token_samples(), sequential=sequential, update=update,
                          allocation="owl", progress=False)
    assert zeros(model) == int(total(model) * 0.7)
    assert report.allocation["kind"] == "owl" and len(report.allocation["block_sparsity"]) == 3
    per_block = [sum(v for k, v in report.layers.items() if k.startswith(f"layers.{i}.")) for i in range(3)]
    assert max(per_block) - min(per_block) > 0.05


def test_owl_refuses_n_m():
    with pytest.raises(SettingsError, match="N:M keeps one pattern"):
        apply_metric(tiny_llama(), "wanda", 0.5, "2:4", calibration=token_samples(), allocation="owl", progress=False)
