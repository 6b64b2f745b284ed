"""A search whose last stage prunes candidates as `apply` does (sequentially, with the recipe's
update), and the stage check that measures how each cheaper stage ranks like that last one."""
import json

import pytest
import torch
from click.testing import CliRunner

from prunerzero import apply_metric
from prunerzero.cli import main
from prunerzero.engine.layers import matrix
from prunerzero.engine.models import all_prunable
from prunerzero.search import run as run_mod
from prunerzero.search.config import SearchConfig
from prunerzero.search.evaluator import Evaluator, Task
from prunerzero.search.fidelity import ranks, spearman
from prunerzero.search.run import run_evolve

from helpers import evaluations, recipe_config
from tiny import search_data, tiny_llama

pytestmark = pytest.mark.usefixtures("own_cache")


config = recipe_config


def test_ranks_and_spearman():
    assert list(ranks([3.0, 1.0, 2.0, 2.0])) == [4.0, 1.0, 2.5, 2.5]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert spearman([1, 2], [2, 1]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(ValueError):
        spearman([1, 2, 3], [1, 2])


def test_the_sequential_stage_scores_the_model_that_apply_gives(tiny_dir):
    cfg = config(tiny_dir)
    assert cfg.fitness == "sequential" and cfg.stage_mode(-1) == "sequential" and cfg.stage_mode(0) == "mask"
    d = search_data()
    files = run_mod.primitive_files(tiny_llama(), cfg, d.calibration, {"X"})
    hessians = run_mod.hessian_file(tiny_llama(), cfg, d.calibration)
    ev = Evaluator(run_mod.setup_for(cfg, d, files, hessians), model=tiny_llama())
    dense = {n: w.clone() for n, w in ev.dense.items()}
    searched = ev.sequential_weights("abs(W)*X")
    applied = tiny_llama()
    apply_metric(applied, "wanda", 0.5, calibration=d.calibration, update="admm", progress=False)
    for name, lin in all_prunable(applied).items():
        assert torch.equal(searched[name] == 0, matrix(lin) == 0), name
        torch.testing.assert_close(searched[name], matrix(lin), rtol=1e-4, atol=1e-5)
    seq = ev(Task("abs(W)*X", 0, 2, sequential=True))
    one_shot = ev(Task("abs(W)*X", 0, 2, reconstruct=True))
    assert seq.error is None and seq.fingerprint != one_shot.fingerprint and seq.nll != one_shot.nll
    assert all(torch.equal(matrix(lin), dense[n]) for n, lin in ev.layers.items())   # dense weights back


def test_a_recipe_search_scores_its_last_stage_baselines_and_hall_of_fame_sequentially(tiny_dir, tmp_path):
    out = run_evolve(config(tiny_dir), tmp_path / "run", data=search_data(), log=lambda *a: None, quiet=True)
    rows = [e for e in evaluations(tmp_path / "run") if not e["cached"]]
    last = [e for e in rows if e["chunks"][1] == 4]
    assert last and all(e["sequential"] and e["update"] == "admm" for e in last)
    assert not any(e["sequential"] for e in rows if e["chunks"][1] < 4)
    assert all(e["sequential"] for e in rows if e["gen"] == "baselines")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["fitness"] == "sequential"
    # the held-out figure of the hall of fame is the sequential one: the model apply would save
    assert out["counters"]["sequentials"] > 0


def test_the_stage_check_correlates_every_stage_with_the_last_and_leaves_the_search_as_it_was(tiny_dir, tmp_path):
    logged = []
    checked = run_evolve(config(tiny_dir, generations=1, stage_check=6), tmp_path / "a", data=search_data(),
                         log=logged.append, quiet=True)
    plain = run_evolve(config(tiny_dir, generations=1), tmp_path / "b", data=search_data(), log=lambda *a: None,
                       quiet=True)
    check = json.loads((tmp_path / "a" / "stage_check.json").read_text())
    assert len(check["candidates"]) == 6 and len({c["metric"] for c in check["candidates"]}) == 6
    assert [s["pruning"] for s in check["stages"]] == ["mask", "one-shot", "sequential"]
    for s in check["stages"]:
        figures = [(c["perplexity"][s["stage"] - 1], c["perplexity"][-1]) for c in check["candidates"]
                   if c["perplexity"][s["stage"] - 1] is not None and c["perplexity"][-1] is not None]
        assert s["candidates"] == len(figures) and s["spearman"] == pytest.approx(spearman(*zip(*figures)))
        best = min(b for _, b in figures)
        usable = [(a, b) for a, b in figures if b <= 10 * best]
        assert s["usable"] == len(usable)
        assert s["spearman_usable"] == (pytest.approx(spearman(*zip(*usable))) if len(usable) >= 3 else None)
    assert check["stages"][-1]["spearman"] == pytest.approx(1.0)
    assert any("stage check over 6 candidates" in line for line in logged)
    # the check draws its candidates from an RNG of its own: the search is the one run without it
    assert [e["canonical"] for e in checked["hall_of_fame"]] == [e["canonical"] for e in plain["hall_of_fame"]]


def test_a_lower_fidelity_sequential_stage_prunes_from_fewer_windows(tiny_dir):
    d = search_data()
    setup = run_mod.setup_for(config(tiny_dir, fitness_samples=2), d, {}, None)
    assert torch.equal(setup.calibration, d.calibration[:2])
    assert run_mod.setup_for(config(tiny_dir, fitness="one-shot"), d, {}, None).calibration is None


def test_the_time_estimates_count_a_sequential_prune_per_candidate_that_reaches_the_last_stage():
    from types import SimpleNamespace
    from prunerzero.search.evolve import Counters
    from prunerzero.search.run import finish_estimate, generation_estimate
    c = SearchConfig(update="admm", stages=(2, 8), proxy_stages=1, baselines=("wanda",), hof_size=1,
                     heldout_chunks=16, population=4, promote=0.5)
    n = Counters(chunk_evals=10, eval_s=10.0, sequential_s=300.0, sequentials=3)
    search = SimpleNamespace(counters=n, hof=[1])
    assert finish_estimate(search, c) == pytest.approx(16 * 3 + 100.0 * 2)
    # every candidate sees 2 chunks; half reach the sequential stage: 8 chunks and one prune each
    assert generation_estimate(search, c) == pytest.approx(4 * (2 + 0.5 * 8 + 0.5 * 100.0))
    # two workers score two models at once (the 2:4 search stopped early when this was summed)
    two = SearchConfig(update="admm", stages=(2, 8), proxy_stages=1, baselines=("wanda",), hof_size=1,
                       heldout_chunks=16, population=4, promote=0.5, workers=2)
    assert finish_estimate(search, two) == pytest.approx((16 * 3 + 100.0 * 2) / 2)
    assert generation_estimate(search, two) == pytest.approx(4 * (2 + 0.5 * 8 + 0.5 * 100.0) / 2)
    # never below the slowest model alone: more workers than models
    many = SearchConfig(update="admm", stages=(2, 8), proxy_stages=1, baselines=("wanda",), hof_size=1,
                        heldout_chunks=16, population=4, promote=0.5, workers=8)
    assert finish_estimate(search, many) == pytest.approx(16 + 100.0)


@pytest.mark.parametrize("args, message", [
    (["--update", "admm", "--fitness-samples", "64"], "--fitness-samples"),
    (["--stage-check", "2"], "--stage-check"),
    (["--fitness", "exact"], "--fitness"),
])
def test_cli_refuses_bad_fitness_settings(tmp_path, args, message):
    r = CliRunner().invoke(main, ["evolve", "--output", str(tmp_path / "run"), *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run").exists()
