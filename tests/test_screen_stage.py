"""The search's cheap first look: --screen-tokens scores the first stage on the first N tokens
of each chunk (cached apart from whole chunks), and the stage check ranks mutants of the seed
metrics, the near-misses a search must tell apart, before random trees."""
import json

import pytest
import torch
from click.testing import CliRunner

from prunerzero.cli import main
from prunerzero.engine.layers import matrix
from prunerzero.search import run as run_mod
from prunerzero.search.config import SearchConfig, SearchConfigError
from prunerzero.search.evaluator import Evaluator, Task
from prunerzero.search.evolve import Search
from prunerzero.search.fidelity import check_candidates
from prunerzero.search.run import run_evolve

from helpers import evaluations, recipe_config
from tiny import search_data, tiny_llama

pytestmark = pytest.mark.usefixtures("own_cache")


def test_the_screen_scores_the_first_tokens_of_its_chunks_and_keeps_them_apart(tiny_dir):
    cfg = recipe_config(tiny_dir, update="none", stages=(1, 2), screen_tokens=16)
    d = search_data()
    files = run_mod.primitive_files(tiny_llama(), cfg, d.calibration, {"X"})
    setup = run_mod.setup_for(cfg, d, files)
    assert torch.equal(setup.chunks["screen"], d.search[:, :16])
    ev = Evaluator(setup, model=tiny_llama())
    dense = {n: w.clone() for n, w in ev.dense.items()}
    short, whole = ev(Task("abs(W)*X", 0, 1, "screen")), ev(Task("abs(W)*X", 0, 1))
    # the masked weights go through buffers the evaluator keeps; the model is dense again after
    assert all(torch.equal(matrix(lin), dense[n]) for n, lin in ev.layers.items())
    assert all(torch.equal(w, dense[n]) for n, w in ev.dense.items())
    assert short.error is None and whole.error is None
    assert short.tokens == 15 and whole.tokens == d.search.shape[1] - 1
    assert short.fingerprint == f"{whole.fingerprint} on screen"   # the same masks, another cache entry
    masks = ev.masks("abs(W)*X")
    pruned = {n: ev.dense[n].masked_fill(masks[n], 0) for n in masks}
    assert short.nll == pytest.approx(ev.nll(pruned, d.search[:1, :16])[0])
    assert whole.nll == pytest.approx(ev.nll(pruned, d.search[:1])[0])


def test_a_search_screens_its_first_stage_and_scores_the_later_ones_on_whole_chunks(tiny_dir, tmp_path):
    run_evolve(recipe_config(tiny_dir, update="none", stages=(1, 2), screen_tokens=16, generations=1),
               tmp_path / "run", data=search_data(), log=lambda *a: None, quiet=True)
    rows = [e for e in evaluations(tmp_path / "run") if not e["cached"] and e["gen"] == 0]
    first = [e for e in rows if e["key"].endswith(" screen16")]
    later = [e for e in rows if not e["key"].endswith(" screen16")]
    assert first and later
    assert all(e["fingerprint"].endswith(" on screen") and e["chunks"] == [0, 1] for e in first)
    # a promoted candidate scores whole chunks from the first: nothing of its screen is mixed in
    assert all(not e["fingerprint"].endswith(" on screen") and e["chunks"] == [0, 2] for e in later)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["screen_tokens"] == 16


@pytest.mark.parametrize("kw, message", [(dict(screen_tokens=512), "shorter than the chunks"),
                                         (dict(screen_tokens=64, stages=(4,)), "two or more"),
                                         (dict(screen_tokens=1), "screen_tokens|screen-tokens")])
def test_impossible_screens_are_refused(kw, message):
    with pytest.raises(Exception, match=message) as e:
        SearchConfig(**kw)
    assert isinstance(e.value, (SearchConfigError, ValueError))


def test_the_cli_refuses_a_screen_as_long_as_the_chunks(tmp_path):
    r = CliRunner().invoke(main, ["evolve", "--output", str(tmp_path / "run"), "--screen-tokens", "512"])
    assert r.exit_code == 2 and "--screen-tokens" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run").exists()


def test_the_stage_check_draws_mutants_of_the_seeds_before_random_trees(tiny_dir, monkeypatch):
    cfg = recipe_config(tiny_dir, update="none", seed_metrics=("wanda",), baselines=("magnitude",))
    search = Search(cfg, run=None, pool=None)
    picked = check_candidates(search, 12)
    assert picked == check_candidates(search, 12)          # drawn from the check's own RNG
    assert len(picked) == 12 and len({search.key(t) for t in picked}) == 12
    assert picked[:2] == ["magnitude", "wanda"]
    # the first two thirds (8) come from the seed and its mutants; with fresh trees that are
    # never new (magnitude again), nothing else is added
    monkeypatch.setattr(search.tb, "individual", lambda: pytest.fail("a fresh tree drawn"))
    monkeypatch.setattr(search, "_valid_fresh", lambda taken: "abs(W)")
    assert check_candidates(search, 12) == picked[:8]


def test_the_time_estimates_price_a_screen_chunk_at_its_share_and_the_next_stage_from_its_first_chunk():
    from types import SimpleNamespace
    from prunerzero.search.evolve import Counters
    from prunerzero.search.run import generation_estimate
    c = SearchConfig(stages=(2, 8), screen_tokens=128, population=4, promote=0.5)
    search = SimpleNamespace(counters=Counters(chunk_evals=10, eval_s=10.0), hof=[])
    # every candidate: 2 chunks of a quarter; half of them: all 8 whole chunks
    assert generation_estimate(search, c) == pytest.approx(4 * (2 * 0.25 + 0.5 * 8))
    plain = SearchConfig(stages=(2, 8), population=4, promote=0.5)
    assert generation_estimate(search, plain) == pytest.approx(4 * (2 + 0.5 * 6))
    s = Search(c, run=None, pool=None)
    assert s.chunk_share(Task("W", 0, 1, "screen")) == 0.25 and s.chunk_share(Task("W", 0, 1)) == 1.0
