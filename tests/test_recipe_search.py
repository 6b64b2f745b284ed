"""`prunerzero evolve --update ...`: a search over recipes (metric mask + reconstruction) on a
tiny random Llama: the proxy stages, the fitness of the reconstructed model (the same weights
that `apply` gives), separate caches for the mask alone and the recipe, kill and resume."""
import json
import math
import signal

import pytest
import torch
from click.testing import CliRunner

from prunerzero import apply_metric
from prunerzero.cli import main
from prunerzero.engine.layers import matrix
from prunerzero.engine.models import all_prunable
from prunerzero.search import run as run_mod
from prunerzero.search.cache import Measured
from prunerzero.search.config import SearchConfig
from prunerzero.search.evaluator import Evaluator, Task
from prunerzero.search.run import run_evolve

from helpers import evaluations, recipe_config, kill_and_resume, search_script
from tiny import search_data, tiny_llama


pytestmark = pytest.mark.usefixtures("own_cache")


def data():
    return search_data()


config = recipe_config


def test_a_recipe_search_ranks_by_the_mask_first_and_by_the_reconstructed_model_after(tiny_dir, tmp_path):
    out = run_evolve(config(tiny_dir), tmp_path / "run", data=data(), log=lambda *a: None, quiet=True)
    rows = [e for e in evaluations(tmp_path / "run") if e["gen"] != "baselines" and not e["cached"]]
    first = [e for e in rows if e["chunks"] == [0, 1]]
    later = [e for e in rows if e["chunks"][1] > 1]
    assert first and all(e["update"] == "none" for e in first)          # stage 1: the proxy
    assert later and all(e["update"] == "admm" for e in later)          # stages 2, 3: the recipe
    baselines = [e for e in evaluations(tmp_path / "run") if e["gen"] == "baselines"]
    assert baselines and all(e["update"] == "admm" for e in baselines)
    assert out["update"]["kind"] == "admm" and out["update"]["iters"] == 20
    assert out["hall_of_fame"] and all(e["heldout_perplexity"] > 1 for e in out["hall_of_fame"])
    c = out["carry_over"]
    wanda, best = out["baselines"]["wanda"], out["hall_of_fame"][0]
    assert c["search_gain"] == pytest.approx(1 - best["search_perplexity"] / wanda["search_perplexity"])
    assert c["heldout_gain"] == pytest.approx(1 - best["heldout_perplexity"] / wanda["heldout_perplexity"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["update"] == "admm" and saved["proxy_stages"] == 1


def test_proxy_stages_zero_measures_every_stage_with_the_update(tiny_dir, tmp_path):
    run_evolve(config(tiny_dir, generations=1, proxy_stages=0), tmp_path / "run", data=data(), log=lambda *a: None,
               quiet=True)
    assert {e["update"] for e in evaluations(tmp_path / "run")} == {"admm"}


def test_the_search_scores_the_weights_that_apply_gives(tiny_dir):
    """A candidate's fitness is that of the model `apply --one-shot --update` would save."""
    cfg = config(tiny_dir, update="obs")
    model = tiny_llama()
    files = run_mod.primitive_files(model, cfg, data().calibration, {"X"})
    hessians = run_mod.hessian_file(model, cfg, data().calibration)
    ev = Evaluator(run_mod.setup_for(cfg, data(), files, hessians), model=tiny_llama())
    searched = ev.reconstructed("abs(W)*X")
    applied = tiny_llama()
    apply_metric(applied, "wanda", 0.5, calibration=data().calibration, sequential=False, update="obs",
                 progress=False)
    for name, lin in all_prunable(applied).items():
        assert torch.equal(searched[name] == 0, matrix(lin) == 0), name
        torch.testing.assert_close(searched[name], matrix(lin), rtol=1e-4, atol=1e-5)
    # and the model the evaluator measures is that one, with the dense weights put back after
    dense = {n: w.clone() for n, w in ev.dense.items()}
    r = ev(Task("abs(W)*X", 0, 2, reconstruct=True))
    masked = ev(Task("abs(W)*X", 0, 2))
    assert r.error is None and r.fingerprint != masked.fingerprint and r.nll != masked.nll
    assert all(torch.equal(matrix(lin), dense[n]) for n, lin in ev.layers.items())


def test_a_mask_measured_further_in_one_go_still_answers_a_shorter_stage():
    m = Measured()
    m.add(0, 4, 8.0, 40)
    assert m.perplexity(2) == pytest.approx(math.exp(0.2))   # the 4-chunk figure, not "failed"
    m2 = Measured([(0, 1, 3.0, 10), (1, 4, 6.0, 30)])
    assert m2.perplexity(1) == pytest.approx(math.exp(0.3)) and m2.perplexity(4) == pytest.approx(math.exp(9 / 40))
    assert Measured([(0, 1, 3.0, 10)]).perplexity(2) == math.inf


def test_a_killed_recipe_search_resumes_to_the_same_hall_of_fame(tiny_dir, tmp_path):
    script = tmp_path / "search.py"
    script.write_text(search_script(tiny_dir, 5, update="admm"))
    kill_and_resume(script, tmp_path, "hall_of_fame.json", signal.SIGKILL)
    whole, cut = (json.loads((tmp_path / r / "hall_of_fame.json").read_text()) for r in ("whole", "cut"))
    assert [e["canonical"] for e in cut["hall_of_fame"]] == [e["canonical"] for e in whole["hall_of_fame"]]
    assert [e["heldout_perplexity"] for e in cut["hall_of_fame"]] == [e["heldout_perplexity"] for e in whole["hall_of_fame"]]
    assert cut["update"]["kind"] == "admm"


@pytest.mark.parametrize("args, message", [
    (["--update", "sgd"], "--update"),
    (["--update", "admm", "--proxy-stages", "3"], "--proxy-stages"),
    (["--update", "admm", "--proxy-stages", "-1"], "--proxy-stages"),
])
def test_cli_refuses_bad_recipe_settings(tmp_path, args, message):
    r = CliRunner().invoke(main, ["evolve", "--output", str(tmp_path / "run"), *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run").exists()


def test_a_catalogued_recipe_prunes_with_its_update_unless_told_otherwise():
    from prunerzero.apply_config import ApplyConfig
    from prunerzero.engine.reconstruct import UPDATES, Update
    from prunerzero.engine.allocation import ALLOCATIONS
    from prunerzero.language.space import load_space
    for name, entry in load_space().catalog.items():
        assert Update.parse(entry.update).kind in UPDATES and entry.allocation in ALLOCATIONS, name
    from prunerzero.cli import UPDATES as CLI_UPDATES
    assert CLI_UPDATES == UPDATES   # the command line's copy, kept so --help does not import torch
    samples = data().calibration
    named, spelled, plain = tiny_llama(), tiny_llama(), tiny_llama()
    report = apply_metric(named, "wanda-admm", 0.5, "2:4", calibration=samples, progress=False)
    apply_metric(spelled, "wanda", 0.5, "2:4", calibration=samples, update="admm", progress=False)
    apply_metric(plain, "wanda-admm", 0.5, "2:4", calibration=samples, update="none", progress=False)
    assert report.update["kind"] == "admm" and report.canonical == "abs(W)*X"
    for (name, a), b, c in zip(all_prunable(named).items(), all_prunable(spelled).values(),
                               all_prunable(plain).values()):
        assert torch.equal(matrix(a), matrix(b)), name
        assert not torch.equal(matrix(a), matrix(c)), name      # the mask alone keeps the dense weights
    assert ApplyConfig(metric="wanda-admm").update == "admm"
    assert ApplyConfig(metric="wanda-admm", update="obs").update == "obs"
    assert ApplyConfig(metric="wanda").update == "none" and ApplyConfig(metric="wanda").allocation == "uniform"
    assert ApplyConfig(metric="wanda-admm", method="sparsegpt").update == "none"
    # a recipe's update parameters reach the pruning and its report
    report = apply_metric(tiny_llama(), "sqrtx-admm", 0.5, "2:4", calibration=samples, progress=False)
    assert report.update["kind"] == "admm" and report.update["correct"] == 0.2
    assert ApplyConfig(metric="sqrtx-admm").update == "admm correct=0.2"


def test_search_data_wikipedia_heldout_searches_on_other_text_than_it_reports(monkeypatch):
    """Search chunks from Wikipedia outside every calibration window; held-out chunks from the
    evaluation text (a stand-in for WikiText-2 here), so gains are checked across sources."""
    from prunerzero import data as data_mod
    from tiny import text, word_tokenizer
    wiki, report = text(4000, seed=1), text(2000, seed=2)
    monkeypatch.setattr(data_mod, "wikipedia_text", lambda: wiki)
    monkeypatch.setattr(data_mod, "wikitext2_rows", lambda split, d=None: [report])
    tok = word_tokenizer(False)
    cfg = SearchConfig(search_data="wikipedia-heldout", stages=(2, 8), heldout_chunks=4, nsamples=6, seqlen=32)
    got, note = run_mod.search_data(tok, cfg)
    assert got.search_source == "wikipedia-heldout" and got.source == "wikitext2" and not note
    ids = tok(wiki, return_tensors="pt").input_ids[0]
    starts = [int(s) for s in (got.calibration[:, None, :] == ids.unfold(0, 32, 1)[None]).all(-1).nonzero()[:, 1]]
    assert len(starts) == 6
    for chunk in got.search:
        lo = int((ids.unfold(0, 32, 1) == chunk).all(-1).nonzero()[0])
        assert all(lo + 32 <= s or s + 32 <= lo for s in starts)          # disjoint from calibration
    report_ids = tok(report, return_tensors="pt").input_ids[0]
    assert torch.equal(got.heldout, report_ids[:4 * 32].reshape(4, 32))   # the first chunks of the report text


def test_carry_over_has_no_ratio_without_a_search_gain():
    def out(best, wanda):
        row = lambda s, h: dict(search_perplexity=s, heldout_perplexity=h)  # noqa: E731
        return dict(baselines={"wanda": row(*wanda)}, hall_of_fame=[row(*best)])
    assert run_mod.carry_over(out((17.515, 54.531), (17.515, 54.531)))["ratio"] is None
    c = run_mod.carry_over(out((9.0, 19.0), (10.0, 20.0)))
    assert c["search_gain"] == pytest.approx(0.1) and c["ratio"] == pytest.approx(0.5)
    assert run_mod.carry_over(dict(baselines={}, hall_of_fame=[])) is None


@pytest.mark.parametrize("update", ["admm", "none"])
def test_the_time_reserved_for_held_out_scoring_counts_a_reconstruction_once_per_model(update):
    """A recipe's reconstruction is paid once per candidate, not per chunk: spread over the
    search's 8-chunk evaluations it made the estimate for 64 held-out chunks 8x too large,
    which left a --time-limit run no time for generations."""
    from types import SimpleNamespace
    from prunerzero.search.evolve import Counters
    from prunerzero.search.run import finish_estimate
    c = SearchConfig(update=update, stages=(2, 8), proxy_stages=1, baselines=("magnitude", "wanda"), hof_size=2,
                     heldout_chunks=64, fitness="one-shot")
    search = SimpleNamespace(counters=Counters(chunk_evals=40, eval_s=40.0, recon_s=600.0, recons=4), hof=[1, 2, 3])
    models = 1 + 2 + 2   # dense, the baselines, the hall of fame
    want = 64 * models + (150.0 * (models - 1) if update == "admm" else 0)
    assert finish_estimate(search, c) == pytest.approx(want)
