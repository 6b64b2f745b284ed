"""`prunerzero evolve` on a tiny random Llama: files, staging, caches, failures, resume, workers."""
import json
import math
import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from prunerzero.cli import main
from prunerzero.search import run as run_mod
from prunerzero.search.config import SearchConfig
from prunerzero.checks import SettingsError
from prunerzero.runs.rundir import RunDir
from prunerzero.search.run import run_evolve

from helpers import kill_and_resume, search_script
from tiny import search_data, tiny_llama

FILES = ["config.json", "log.jsonl", "evaluations.jsonl", "checkpoint.json", "hall_of_fame.json", "fitness.png"]


pytestmark = pytest.mark.usefixtures("own_cache")


def data():
    return search_data()


def config(tiny_dir, **kw):
    base = dict(model=str(tiny_dir), population=8, generations=3, elite=1, stages=(1, 2, 4), promote=0.5,
                heldout_chunks=4, hof_size=3, threads=1)
    return SearchConfig(**{**base, **kw})


def fame(run):
    out = json.loads((Path(run) / "hall_of_fame.json").read_text())
    return [(e["canonical"], e["search_perplexity"]) for e in out["hall_of_fame"]]


def test_a_short_search_writes_every_file_and_stages_save_evaluations(tiny_dir, tmp_path):
    out = run_evolve(config(tiny_dir), tmp_path / "run", data=data(), log=lambda *a: None, quiet=True)
    for f in FILES:
        assert (tmp_path / "run" / f).is_file(), f
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert set(SearchConfig().to_dict()) <= set(cfg) and cfg["data"]["search_chunks"] == 4
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["gen"] for r in log] == [0, 1, 2]
    last = log[-1]
    assert last["chunk_evals"] < last["chunks_without_staging"]
    assert all(r["best"] is not None and r["best"] > 1 for r in log)
    assert [r["best"] for r in log] == sorted([r["best"] for r in log], reverse=True)  # elitism: never worse
    assert 1 <= len(out["hall_of_fame"]) <= 3 and len({e["canonical"] for e in out["hall_of_fame"]}) == len(out["hall_of_fame"])
    for e in out["hall_of_fame"] + list(out["baselines"].values()) + [out["dense"]]:
        assert e["heldout_perplexity"] > 1
    assert set(out["baselines"]) == {"magnitude", "wanda", "obs", "pruner-zero"}


def test_staging_promotes_the_requested_fraction(tiny_dir, tmp_path):
    # no baselines: a candidate whose masks a baseline measured on every chunk needs no evaluation row
    run_evolve(config(tiny_dir, generations=1, population=8, promote=0.5, baselines=()), tmp_path / "run",
               data=data(), log=lambda *a: None, quiet=True)
    evals = [json.loads(line) for line in (tmp_path / "run" / "evaluations.jsonl").read_text().splitlines()]
    gen0 = [e for e in evals if e["gen"] == 0 and e["perplexity"] is not None]
    reached = {k: sum(1 for e in gen0 if e["chunks"][1] == k) for k in (1, 2, 4)}
    first = reached[1]
    assert reached[2] == math.ceil(first * 0.5) and reached[4] == math.ceil(reached[2] * 0.5)


def test_rank_equivalent_metrics_and_equal_masks_are_not_evaluated_twice(tiny_dir, tmp_path):
    from prunerzero.search.evolve import Search
    from prunerzero.runs.pools import InProcess
    from prunerzero.runs.rundir import RunDir
    cfg = config(tiny_dir)
    files = run_mod.primitive_files(tiny_llama(), cfg, data().calibration, {"X"})
    pool = InProcess(run_mod.setup_for(cfg, data(), files), worker=run_mod.Evaluator)
    run = RunDir(tmp_path / "run")
    run.create({})
    search = Search(cfg, run, pool, quiet=True)
    search._measure(["abs(W)*X"], 4, "")
    n = search.counters.evaluations
    ppl = search._measure(["2*X*abs(W)", "sqr(W)*sqr(X)", "tanh(abs(W)*X)"], 4, "")
    assert search.counters.evaluations == n and search.counters.key_hits == 3
    assert len(set(ppl.values())) == 1
    # a different key whose masks are the same in float32 (X + 1e-30 == X): found by fingerprint
    search._measure(["abs(W)*(X + 1e-30)"], 4, "")
    assert search.counters.evaluations == n and search.counters.mask_hits == 1


def test_failing_candidates_are_logged_and_do_not_stop_the_search(tiny_dir, tmp_path, monkeypatch):
    def x_with_nan(model, samples):
        x = run_mod.compute_x(model, samples)
        x["layers.1.mlp.down_proj"][0, 3] = float("nan")
        return x
    monkeypatch.setitem(run_mod.COMPUTE, "X", x_with_nan)
    out = run_evolve(config(tiny_dir, seed_metrics=("wanda", "magnitude")), tmp_path / "run", data=data(),
                     log=lambda *a: None, quiet=True)
    failures = [json.loads(line) for line in (tmp_path / "run" / "failures.jsonl").read_text().splitlines()]
    assert failures and all("X" in f["metric"] for f in failures)
    assert any("NonFiniteScoreError" in f["error"] for f in failures)
    assert out["baselines"]["wanda"]["search_perplexity"] is None
    assert out["hall_of_fame"] and all("X" not in e["simplified"] for e in out["hall_of_fame"])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_killed_search_resumes_to_the_same_hall_of_fame(tiny_dir, tmp_path, sig):
    script = tmp_path / "search.py"
    script.write_text(search_script(tiny_dir, 6))
    kill_and_resume(script, tmp_path, "hall_of_fame.json", sig)
    assert fame(tmp_path / "cut") == fame(tmp_path / "whole")
    gens = [json.loads(line)["gen"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert gens == list(range(6))
    # the killed generation's evaluations were dropped and redone once: the same rows as the whole run's
    rows = lambda run: [(r["gen"], r["metric"], r["chunks"]) for r in RunDir(run).read_lines("evaluations.jsonl")]  # noqa: E731
    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")


def test_two_workers_give_the_same_results_as_one(tiny_dir, tmp_path):
    one = run_evolve(config(tiny_dir, generations=2), tmp_path / "one", data=data(), log=lambda *a: None, quiet=True)
    two = run_evolve(config(tiny_dir, generations=2, workers=2), tmp_path / "two", data=data(), log=lambda *a: None,
                     quiet=True)
    assert fame(tmp_path / "one") == fame(tmp_path / "two")
    assert one["baselines"] == two["baselines"]


def test_the_ray_path_runs_locally(tiny_dir, tmp_path):
    ray = pytest.importorskip("ray")
    try:
        local = run_evolve(config(tiny_dir, generations=1), tmp_path / "local", data=data(), log=lambda *a: None,
                           quiet=True)
        remote = run_evolve(config(tiny_dir, generations=1, ray=True, workers=2), tmp_path / "ray", data=data(),
                            log=lambda *a: None, quiet=True)
    finally:
        ray.shutdown()
    assert fame(tmp_path / "local") == fame(tmp_path / "ray")
    assert local["baselines"] == remote["baselines"]


def test_random_strategy_and_seed_metrics(tiny_dir, tmp_path):
    out = run_evolve(config(tiny_dir, strategy="random", generations=2, seed_metrics=("wanda",)), tmp_path / "run",
                     data=data(), log=lambda *a: None, quiet=True)
    assert out["settings"]["strategy"] == "random" and out["hall_of_fame"]


@pytest.mark.parametrize("args, message", [
    (["--stages", "4,2"], "stages must be increasing"),
    (["--seed-metrics", "gblm"], "outside the search space"),
    (["--structure", "3:2"], "N:M needs 0 < N < M"),
])
def test_cli_bad_settings_are_clear_errors(tmp_path, args, message):
    r = CliRunner().invoke(main, ["evolve", "--output", str(tmp_path / "run"), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_cli_refuses_a_non_empty_run_folder_and_a_missing_one(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("")
    r = CliRunner().invoke(main, ["evolve", "--output", str(tmp_path / "run")])
    assert r.exit_code == 2 and "--resume" in r.output
    r = CliRunner().invoke(main, ["evolve", "--resume", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "not a run folder" in r.output


def test_offspring_of_crossover_and_mutation_compile_and_score():
    import random
    from prunerzero import DegenerateMetricError, Metric
    from prunerzero.language.compile import check_scores
    from prunerzero.search.gp import primitive_set, toolbox, vary
    random.seed(0)
    pset = primitive_set()
    tb = toolbox(pset)
    pop = [tb.individual() for _ in range(60)]
    torch.manual_seed(0)
    prims = dict(W=torch.randn(8, 16), G=torch.rand(8, 16), X=torch.rand(1, 16) * 5, H=torch.rand(1, 16) * 20)
    scored = 0
    for _ in range(5):
        pop = vary(pop, tb, 0.7, 0.3)
        for ind in pop:
            try:
                m = Metric.parse(str(ind))
            except DegenerateMetricError:
                continue
            scores = m.compile()(**{k: v for k, v in prims.items() if k in m.terminals or k == "W"})
            assert scores.shape == (8, 16)
            try:
                check_scores(scores, where=str(ind))
            except DegenerateMetricError:
                continue
            scored += 1
    assert scored > 30


def test_a_time_limit_the_set_up_cannot_meet_is_refused_before_the_work(tiny_dir, tmp_path):
    with pytest.raises(SettingsError, match=r"--time-limit 0 s cannot be met: the set-up alone takes about"):
        run_evolve(config(tiny_dir, time_limit=1e-3), tmp_path / "r", data=data(), log=lambda *a: None)
    assert not (tmp_path / "r").exists()


def test_a_time_limit_without_room_for_a_generation_scores_the_baselines_and_stops(tiny_dir, tmp_path, monkeypatch):
    """The estimate of a generation (measured seconds per chunk) decides before generation 0; a
    resume with a new limit goes on from where it stopped; only the chosen baseline is measured."""
    monkeypatch.setattr(run_mod, "generation_estimate", lambda search, c: 2e6)
    lines = []
    out = run_evolve(config(tiny_dir, generations=50, time_limit=1e6, baselines=("wanda",)), tmp_path / "r",
                     data=data(), log=lines.append)
    assert out["generations"] == 0 and set(out["baselines"]) == {"wanda"}
    assert any("no generation fits" in line for line in lines)
    stop = [line for line in lines if line.startswith("time limit")]
    assert len(stop) == 1 and "final scoring" in stop[0]
    assert out["baselines"]["wanda"]["heldout_perplexity"] > 0
    monkeypatch.setattr(run_mod, "generation_estimate", lambda search, c: 1.0)
    lines.clear()
    out = run_evolve(resume=tmp_path / "r", generations=3, time_limit=1e9, data=data(), log=lines.append)
    assert out["generations"] == 3 and not any(line.startswith("time limit") for line in lines)
    assert any("generation(s) fit" in line for line in lines)
    assert any(line.startswith("apply it: prunerzero apply --metric") for line in lines)
    assert any(line.startswith("results: ") and "hall_of_fame.json" in line for line in lines)


def test_resume_passes_a_typed_time_limit_and_only_a_typed_one(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(run_mod, "run_evolve", lambda **kw: calls.append(kw))
    for extra in (["--time-limit", "900"], []):
        result = CliRunner().invoke(main, ["evolve", "--resume", str(tmp_path), "--quiet"] + extra)
        assert result.exit_code == 0, result.output
    assert [c["overrides"] for c in calls] == [{"time_limit": 900.0}, {}]
