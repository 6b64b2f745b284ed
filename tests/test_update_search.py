"""`evolve --search metric,update`: a candidate is a metric and the settings of its update; the
settings move on ladders, each part can be frozen, the hall of fame and the apply command give
every part, and a killed run resumes to the same result."""
import json
import random
import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from prunerzero.cli import main
from prunerzero.engine.reconstruct import Update
from prunerzero.search import recipe
from prunerzero.search.config import SearchConfig
from prunerzero.search.run import run_evolve

from helpers import kill_and_resume, search_script
from tiny import search_data

pytestmark = pytest.mark.usefixtures("own_cache")


def config(tiny_dir, **kw):
    base = dict(model=str(tiny_dir), population=6, generations=2, elite=1, stages=(1, 2), promote=0.5,
                heldout_chunks=2, hof_size=3, threads=1, update="admm iters=6 gradual=4", fitness="one-shot",
                baselines=("wanda",))
    return SearchConfig(**{**base, **kw})


def evaluations(run):
    return [json.loads(line) for line in (Path(run) / "evaluations.jsonl").read_text().splitlines()]


def test_update_specs_read_back_to_the_same_update_and_equal_settings_spell_one_way():
    for text in ("admm", "admm-pcg rho=0.5 iters=30 refine=20", "obs percdamp=0.03 blocksize=64", "admm correct=0.2"):
        u = Update.parse(text)
        assert Update.parse(u.spec()) == u
    assert Update.parse("admm percdamp=0.1").spec() == "admm"           # ADMM's default damping
    assert Update.parse("admm-pcg refine=0").spec() == "admm"           # no refinement: plain ADMM
    assert Update.parse("admm-pcg refine=10").spec() == "admm-pcg"
    for bad, word in (("admm rho", "rho"), ("admm speed=2", "speed"), ("admm rho=fast", "number"), ("sgd", "one of")):
        with pytest.raises(Exception, match=word):
            Update.parse(bad)


def test_mutations_and_crossovers_stay_on_the_ladders_and_give_valid_updates():
    rng = random.Random(0)
    seen = set()
    text = "admm"
    for _ in range(300):
        text = recipe.mutate(text, rng)
        u = Update.parse(text)
        assert u.is_admm and u.gradual <= u.iters and u.rho in recipe.ADMM_LADDERS["rho"]
        assert u.iters in recipe.ADMM_LADDERS["iters"] and u.damping in recipe.ADMM_LADDERS["percdamp"]
        assert u.correct in recipe.ADMM_LADDERS["correct"]
        seen.add(text)
    assert len(seen) > 50
    a, b = "admm rho=4.0 iters=40", "admm-pcg percdamp=0.01 refine=5"
    for _ in range(20):
        x, y = recipe.cross(a, b, rng)
        for name in ("rho", "iters", "percdamp", "refine"):   # each setting comes from one of the parents
            got = sorted(recipe._value(Update.parse(t), name) for t in (x, y))
            assert got == sorted(recipe._value(Update.parse(t), name) for t in (a, b)), name
    assert recipe.mutate("none", rng) == "none"


def test_a_joint_search_varies_both_parts_and_reports_each(tiny_dir, tmp_path):
    out = run_evolve(config(tiny_dir, search=("metric", "update"), seed_metrics=("wanda",)), tmp_path / "run",
                     data=search_data(), log=lambda *a: None, quiet=True)
    rows = [e for e in evaluations(tmp_path / "run") if e["update"] != "none"]
    assert len({e["update"] for e in rows}) > 2 and len({e["metric"] for e in rows}) > 2
    best = out["hall_of_fame"][0]
    assert Update.parse(best["update"]) and best["update"] in [e["update"] for e in rows]
    assert "update" in json.loads((tmp_path / "run" / "config.json").read_text())["search"]


def test_a_frozen_metric_stays_the_seed_and_a_frozen_update_stays_the_given_one(tiny_dir, tmp_path):
    run_evolve(config(tiny_dir, search=("update",), seed_metrics=("wanda",)), tmp_path / "u", data=search_data(),
               log=lambda *a: None, quiet=True)
    rows = [e for e in evaluations(tmp_path / "u") if e["gen"] != "baselines"]
    assert {e["metric"] for e in rows} == {"abs(W)*X"} and len({e["update"] for e in rows if e["update"] != "none"}) > 2
    run_evolve(config(tiny_dir), tmp_path / "m", data=search_data(), log=lambda *a: None, quiet=True)
    rows = evaluations(tmp_path / "m")
    assert {e["update"] for e in rows} <= {"none", "admm iters=6 gradual=4"}
    assert len({e["metric"] for e in rows}) > 2


def test_a_killed_joint_search_resumes_to_the_same_hall_of_fame(tiny_dir, tmp_path):
    script = tmp_path / "search.py"
    script.write_text(search_script(tiny_dir, 4, update="admm iters=6 gradual=4", search=("metric", "update"),
                                    seed_metrics=("wanda",), fitness="one-shot"))
    kill_and_resume(script, tmp_path, "hall_of_fame.json", signal.SIGKILL)
    whole, cut = (json.loads((tmp_path / r / "hall_of_fame.json").read_text()) for r in ("whole", "cut"))
    assert [(e["canonical"], e["update"]) for e in cut["hall_of_fame"]] == \
        [(e["canonical"], e["update"]) for e in whole["hall_of_fame"]]
    assert [e["heldout_perplexity"] for e in cut["hall_of_fame"]] == [e["heldout_perplexity"] for e in whole["hall_of_fame"]]


@pytest.mark.parametrize("args, message", [
    (["--search", "metric,layout"], "--search"),
    (["--search", "allocation", "--structure", "2:4", "--seed-metrics", "wanda"], "--search allocation"),
    (["--search", "update"], "--update"),
    (["--search", "update", "--update", "admm"], "--seed-metrics"),
    (["--update", "admm rho=fast"], "--update"),
    (["--search", "metric,update", "--update", "admm", "--fixed-settings", "percdamp,speed"], "--fixed-settings"),
    (["--update", "admm", "--fixed-settings", "percdamp"], "add update to --search"),
])
def test_cli_refuses_bad_search_parts(tmp_path, args, message):
    r = CliRunner().invoke(main, ["evolve", "--output", str(tmp_path / "run"), *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run").exists()


def test_allocation_genes_keep_the_total_exact_and_read_back():
    from prunerzero.engine.allocation import layer_counts
    from prunerzero.engine.models import all_prunable
    from prunerzero.engine.layers import matrix
    from tiny import tiny_llama
    layers = all_prunable(tiny_llama(layers=4))
    sizes = {n: matrix(l).numel() for n, l in layers.items()}
    genes = recipe.AllocationGenes(sizes, 0.6)
    assert len(genes.groups) == 8 and genes.text(genes.start) == "0" * 8
    rng, text, seen = random.Random(1), genes.text(genes.start), set()
    for _ in range(40):
        text = genes.mutate(text, rng)
        seen.add(text)
        assert genes.parse(text) and genes.text(genes.parse(text)) == text
        counts = layer_counts(layers, genes.sparsity_of(text), 0.6)
        assert sum(counts.values()) == int(sum(sizes.values()) * 0.6)       # exact to the weight
    assert len(seen) > 5 and any(set(t) != {"0"} for t in seen)
    for bad in ("0" * 7, "z" * 8, "a" + "0" * 7):   # wrong length, off the ladder, total changed
        with pytest.raises(ValueError):
            genes.parse(bad)


def test_an_allocation_search_varies_per_layer_sparsity_and_apply_reproduces_its_best(tiny_dir, tmp_path):
    from prunerzero import apply_metric
    from prunerzero.engine.layers import matrix
    from prunerzero.engine.models import all_prunable
    from prunerzero.search import run as run_mod
    from tiny import tiny_llama
    cfg = config(tiny_dir, search=("allocation",), seed_metrics=("wanda",), sparsity=0.6, update="admm iters=6 gradual=4",
                 fitness="sequential")
    out = run_evolve(cfg, tmp_path / "run", data=search_data(), log=lambda *a: None, quiet=True)
    rows = [e for e in evaluations(tmp_path / "run") if e["gen"] != "baselines"]
    assert {e["metric"] for e in rows} == {"abs(W)*X"} and {e["update"] for e in rows} <= {"none", cfg.update}
    best = out["hall_of_fame"][0]
    assert len(best["allocation"]) == 4 and Path(best["allocation_file"]).is_file()
    assert len({r["allocation"] for r in out["hall_of_fame"]}) == len(out["hall_of_fame"])   # one entry each
    # apply with the saved allocation prunes the weights the search scored last (sequentially)
    files = run_mod.primitive_files(tiny_llama(), cfg, search_data().calibration, {"X"})
    ev = run_mod.Evaluator(run_mod.setup_for(cfg, search_data(), files, None), model=tiny_llama())
    genes = recipe.AllocationGenes({n: w.numel() for n, w in ev.dense.items()}, 0.6)
    searched = ev.sequential_weights("abs(W)*X", Update.parse(cfg.update), genes.sparsity_of(best["allocation"])
                                     if set(best["allocation"]) != {"0"} else None)
    applied = tiny_llama()
    report = apply_metric(applied, "wanda", 0.6, calibration=search_data().calibration, update=cfg.update,
                          allocation=best["allocation_file"], progress=False)
    assert report.sparsity == pytest.approx(0.6, abs=1e-4)   # int(total * 0.6) weights
    for name, lin in all_prunable(applied).items():
        torch.testing.assert_close(searched[name], matrix(lin), rtol=1e-4, atol=1e-5)


def test_apply_refuses_an_allocation_file_of_another_model(tmp_path):
    from prunerzero import apply_metric
    from tiny import tiny_llama, token_samples
    bad = tmp_path / "a.json"
    bad.write_text(json.dumps({"sparsity": {"layers.0.mlp.up_proj": 0.5}}))
    with pytest.raises(Exception, match="another model"):
        apply_metric(tiny_llama(), "wanda", 0.5, calibration=token_samples(), allocation=str(bad), progress=False)
    r = CliRunner().invoke(main, ["apply", "--allocation", str(tmp_path / "none.json"), "--output", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no such file" in r.output


def test_fixed_settings_never_move_in_mutation_crossover_or_fresh_draws():
    rng = random.Random(1)
    fixed = ("percdamp", "rho")
    text, other = "admm percdamp=0.3 rho=2.0", "admm percdamp=0.01 rho=0.25 iters=40"
    moved = set()
    for _ in range(200):
        text = recipe.mutate(text, rng, fixed=fixed)
        drawn = recipe.fresh(text, rng, fixed=fixed)
        x, y = recipe.cross(text, other, rng, fixed=fixed)
        for t in (text, drawn, x):
            u = Update.parse(t)
            assert (u.damping, u.rho) == (0.3, 2.0), t
            moved.add((u.iters, u.gradual, u.correct, u.refine_steps))
        assert (Update.parse(y).damping, Update.parse(y).rho) == (0.01, 0.25)
    assert len(moved) > 20   # the others still move
    # every setting fixed: nothing left to vary
    assert recipe.mutate("admm", rng, fixed=recipe.SETTINGS) == "admm"


def test_block_tuning_given_to_a_recipe_search_stays_in_every_candidate():
    # tune is no ladder of the search (each epoch costs a pass and a backward of every block),
    # so `evolve --update "admm tune=1"` searches the other settings around it
    rng = random.Random(2)
    text, other = "admm tune=1 tune_lr=0.0003", "admm tune=1 tune_lr=0.0003 rho=0.5"
    for _ in range(50):
        text = recipe.mutate(text, rng)
        for t in (text, recipe.fresh(text, rng), *recipe.cross(text, other, rng)):
            u = Update.parse(t)
            assert (u.tune, u.tune_lr) == (1, 0.0003), t


def test_a_search_with_fixed_settings_keeps_them_in_every_candidate(tiny_dir, tmp_path):
    cfg = config(tiny_dir, search=("update",), seed_metrics=("wanda",), update="admm iters=6 gradual=4 rho=0.5",
                 fixed_settings=("rho", "percdamp"))
    run_evolve(cfg, tmp_path / "run", data=search_data(), log=lambda *a: None, quiet=True)
    updates = {e["update"] for e in evaluations(tmp_path / "run") if e["gen"] != "baselines" and e["update"] != "none"}
    assert len(updates) > 2
    assert {(Update.parse(u).rho, Update.parse(u).damping) for u in updates} == {(0.5, 0.1)}


def _reached_last_stage(run, stages=2) -> list[bool]:
    """For each candidate new in the last generation: whether it was judged at the last stage."""
    state = json.loads((Path(run) / "checkpoint.json").read_text())["state"]
    population = state["population"]
    return [r["fitness"][0] == stages - 1 for r in population[1:]]   # the first is the elite


def test_fast_track_sends_new_updates_of_a_proven_mask_past_the_mask_only_ranking(tiny_dir, tmp_path):
    # the metric frozen: every candidate keeps the seed's mask, which the hall of fame holds after
    # generation 0, so the mask-only stage cannot tell them apart and only its ranking stops them
    kw = dict(search=("update",), seed_metrics=("wanda",), generations=2)
    run_evolve(config(tiny_dir, **kw), tmp_path / "plain", data=search_data(), log=lambda *a: None, quiet=True)
    run_evolve(config(tiny_dir, fast_track=True, **kw), tmp_path / "fast", data=search_data(),
               log=lambda *a: None, quiet=True)
    plain, fast = _reached_last_stage(tmp_path / "plain"), _reached_last_stage(tmp_path / "fast")
    assert sum(plain) == 3 and all(fast) and len(fast) == 5   # 5 offspring, promote 0.5: 3 by rank, 2 more
    counters = json.loads((tmp_path / "fast" / "checkpoint.json").read_text())["state"]["counters"]
    assert counters["fast_tracked"] == 2


def test_fast_track_needs_the_update_searched(tiny_dir):
    with pytest.raises(Exception, match="--fast-track"):
        SearchConfig(model=str(tiny_dir), update="admm", fast_track=True)
