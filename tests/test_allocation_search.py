"""`--allocation search` (EvoPress-style, on DarwinLM's search machinery) on a tiny random Llama:
exact totals, levels, fitness that never gets worse, resume and reuse of the run folder."""
import json

import pytest
import torch

from prunerzero import apply_metric
from prunerzero.search.allocation import AllocationSearchConfig, LevelMasks, ladder, search_allocation
from prunerzero.checks import SettingsError
from prunerzero.errors import NonFiniteScoreError
from prunerzero.engine.layers import matrix
from prunerzero.engine.masks import make_mask
from prunerzero.language.metric import Metric
from prunerzero.engine.models import all_prunable
from prunerzero.progress import saying

from tiny import tiny_llama, token_samples

SAMPLES = token_samples(4, 32, 0)
# the last stage scores every calibration window, so a generation's winner is never worse than its parent
SMALL = dict(offspring=3, stages=((0, 64, 1), (0, 128, 1)), levels=3)


def settings(**kw):
    return AllocationSearchConfig(**{**SMALL, **kw})


def zeros(model):
    return sum(int((matrix(lin) == 0).sum()) for lin in all_prunable(model).values())


def test_the_levels_are_prefixes_of_one_sort_of_the_metrics_scores():
    model = tiny_llama()
    layers = all_prunable(model)
    masks = LevelMasks(model, layers, Metric.parse("wanda"), SAMPLES)
    from prunerzero.engine.calibration import compute_x
    x = compute_x(model, SAMPLES)
    for name, lin in layers.items():
        W = matrix(lin)
        for s in (0.3, 0.55):
            assert torch.equal(masks.mask(name, W.shape, s), make_mask(W.abs() * x[name], s)), name
    # dense primitives at hand are used, not computed again, and their scores are checked
    bad = {name: v.clone() for name, v in x.items()}
    bad[next(iter(bad))][0, 0] = float("nan")
    with pytest.raises(NonFiniteScoreError):
        LevelMasks(model, layers, Metric.parse("wanda"), SAMPLES, known={"X": bad})
    assert ladder(0.5, settings()) == [0.425, 0.45, 0.475, 0.5, 0.525, 0.55, 0.575]
    assert ladder(0.9, settings(max_sparsity=0.95)) == [0.825, 0.85, 0.875, 0.9, 0.925, 0.95]


def test_a_search_keeps_the_total_exact_and_never_worsens_its_fitness(tmp_path):
    model = tiny_llama(layers=3)
    report = apply_metric(model, "wanda", 0.6, calibration=SAMPLES, progress=False,
                          allocation=settings(generations=4, run=str(tmp_path / "run")))
    total = sum(matrix(lin).numel() for lin in all_prunable(model).values())
    assert zeros(model) == int(total * 0.6)                       # exact to the weight
    a = report.allocation
    assert a["kind"] == "search" and a["generations"] == 4
    assert set(a["layer_sparsity"].values()) <= set(a["levels"])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    kls = [r["kl"] for r in log]
    assert kls == sorted(kls, reverse=True) and a["kl_found"] <= a["kl_uniform"]
    assert all(r["params"] == log[0]["params"] for r in log)      # every generation at the same total


def test_a_search_continues_from_its_folder_and_a_finished_one_is_reused(tmp_path):
    model = tiny_llama(layers=2)
    layers = all_prunable(model)
    whole, _ = search_allocation(model, layers, "wanda", SAMPLES, 0.5, settings(generations=4), tmp_path / "whole",
                                 progress=False)
    search_allocation(model, layers, "wanda", SAMPLES, 0.5, settings(generations=2), tmp_path / "cut", progress=False)
    more, report = search_allocation(model, layers, "wanda", SAMPLES, 0.5, settings(generations=4), tmp_path / "cut",
                                     progress=False)
    assert more == whole and report["generations"] == 4
    lines = []
    with saying(lines.append):
        again, _ = search_allocation(model, layers, "wanda", SAMPLES, 0.5, settings(generations=4), tmp_path / "cut",
                                     progress=False)
    assert again == whole and any("reusing" in line for line in lines)
    dense = tiny_llama(layers=2)
    assert all(torch.equal(matrix(lin), matrix(d)) for lin, d in zip(layers.values(), all_prunable(dense).values()))
    with pytest.raises(SettingsError, match="other settings"):
        search_allocation(model, layers, "magnitude", SAMPLES, 0.5, settings(generations=5), tmp_path / "cut",
                          progress=False)


def test_a_cut_run_with_damaged_settings_is_discarded_and_done_again(tmp_path):
    model = tiny_llama(layers=2)
    layers = all_prunable(model)
    whole, _ = search_allocation(model, layers, "wanda", SAMPLES, 0.5, settings(generations=3), tmp_path / "whole",
                                 progress=False)
    search_allocation(model, layers, "wanda", SAMPLES, 0.5, settings(generations=1), tmp_path / "cut", progress=False)
    (tmp_path / "cut" / "config.json").write_text("{not json")
    lines = []
    with saying(lines.append):
        redone, report = search_allocation(model, layers, "wanda", SAMPLES, 0.5, settings(generations=3),
                                           tmp_path / "cut", progress=False)
    assert any("discarding" in line for line in lines)
    assert redone == whole and report["generations"] == 3
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["sparsity"] == 0.5


def test_bad_allocation_search_settings_are_refused():
    with pytest.raises(SettingsError, match="step"):
        settings(step=0)
    with pytest.raises(SettingsError, match="stages"):
        settings(stages=((0, 0, 1),))
    with pytest.raises(SettingsError, match="max_sparsity"):
        search_allocation(tiny_llama(), all_prunable(tiny_llama()), "wanda", SAMPLES, 0.97, settings(), progress=False)
    with pytest.raises(SettingsError, match="unstructured"):
        apply_metric(tiny_llama(), "wanda", 0.5, "2:4", calibration=SAMPLES, allocation="search", progress=False)


def test_apply_allocation_search_keeps_its_run_in_the_cache_and_reuses_it(tmp_path, monkeypatch):
    from prunerzero import pipeline
    from tiny import text, word_tokenizer
    monkeypatch.setenv("PRUNERZERO_CACHE", str(tmp_path / "cache"))
    tiny_llama().save_pretrained(tmp_path / "m")
    word_tokenizer(True).save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text("\n".join(text(300, s) for s in range(8)))
    common = dict(model=str(tmp_path / "m"), metric="wanda", sparsity=0.6, allocation="search", allocation_generations=2,
                  calibration=str(tmp_path / "t.txt"), eval_data=str(tmp_path / "t.txt"), seqlen=16, nsamples=4,
                  eval_chunks=2)
    first, second = [], []
    a = pipeline.run_apply(output=str(tmp_path / "a"), log=first.append, **common)
    b = pipeline.run_apply(output=str(tmp_path / "b"), log=second.append, **common)
    runs = list((tmp_path / "cache" / "allocations").iterdir())
    assert len(runs) == 1 and (runs[0] / "allocation.json").is_file()
    assert any("reusing" in line for line in second) and not any("reusing" in line for line in first)
    assert a["allocation"]["layer_sparsity"] == b["allocation"]["layer_sparsity"]
    assert a["allocation"]["generations"] == 2 and a["settings"]["allocation"] == "search"
