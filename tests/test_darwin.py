"""DarwinLM structured pruning on a tiny random Llama with grouped-query attention
(4 query heads sharing 2 key-value heads): database, mutation, selection, shrinking,
save/reload, resume and bad input."""
import copy
import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from prunerzero.checks import SettingsError
from prunerzero.cli import main
from prunerzero.loading import load_model
from prunerzero.structured.config import DarwinConfig, DarwinConfigError
from prunerzero.structured.database import build_database, greedy_obs, kept_counts
from prunerzero.structured.genome import LevelSpace
from prunerzero.structured.run import DarwinData, run_darwin
from prunerzero.structured.search import evaluations_left, select
from prunerzero.structured.shrink import apply_masked, load_structured, materialize, save_structured
from prunerzero.structured.units import StructureError, anatomy

from helpers import kill_and_resume
from tiny import tiny_llama, token_samples

LAYERS = 3


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=LAYERS)


@pytest.fixture(scope="module")
def db(model, tmp_path_factory):
    return build_database(model, token_samples(8, 32), tmp_path_factory.mktemp("db"), {"test": 1}, progress=False)


@pytest.fixture(scope="module")
def space(db):
    return LevelSpace.of_database(db)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNERZERO_CACHE", str(tmp_path / "cache"))


def module_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_database_levels_have_exact_sizes(model, db, space):
    an = anatomy(model)
    assert [len(lv.kept) for lv in db.levels["attn"][0]] == kept_counts(an.heads, db.ladder) == [4, 3, 2, 1, 0]
    assert [len(lv.kept) for lv in db.levels["mlp"][0]] == kept_counts(an.channels, db.ladder, 8)
    for kind, off in (("attn", 0), ("mlp", LAYERS)):
        for layer in range(LAYERS):
            for index, level in enumerate(db.levels[kind][layer]):
                genome = [0] * (2 * LAYERS)
                genome[off + layer] = index
                small = materialize(model, db, tuple(genome))
                block = small.model.layers[layer]
                built = module_params(block.self_attn if kind == "attn" else block.mlp)
                assert built == level.params, (kind, layer, index)
                W = db.weights(kind, layer, index)
                if 0 < index and level.kept:
                    unit = an.head_dim if kind == "attn" else 1
                    assert W.shape == (an.hidden, len(level.kept) * unit)
    assert space.params(space.dense) == module_params(model.model.layers) - 2 * LAYERS * an.hidden
    assert db.build_s > 0  # the build time is kept with the database, for reports of runs that reuse it


def test_obs_update_beats_dropping_the_same_columns():
    torch.manual_seed(0)
    X = torch.randn(256, 24) @ torch.randn(24, 24)  # correlated inputs: others can stand in
    W = torch.randn(8, 24)
    H = X.T @ X
    found = greedy_obs(W, H, [[c] for c in range(24)], [24, 12], percdamp=0.0)
    kept, W12, err = found[12]
    dropped = W.clone()
    dropped[:, [c for c in range(24) if c not in kept]] = 0
    plain = float(((X @ (W - dropped).T) ** 2).sum() / ((X @ W.T) ** 2).sum())
    full = torch.zeros_like(W)
    full[:, list(kept)] = W12
    real = float(((X @ (W - full).T) ** 2).sum() / ((X @ W.T) ** 2).sum())
    assert real == pytest.approx(err, rel=1e-3)
    assert real < 0.7 * plain


def test_mutation_keeps_the_parameter_count_exactly(space):
    start = space.uniform(0.6)
    rng, g, moved = random.Random(0), start, 0
    for _ in range(300):
        child = space.mutate(g, rng, rng.randint(1, 3))
        assert space.params(child) == space.params(start)
        moved += child != g
        g = child
    assert moved > 250 and g != start


def test_per_layer_error_allocation_is_exact_and_beats_uniform_on_error(space):
    start = space.uniform(0.6)
    alloc = space.by_error(space.params(start))
    assert space.params(alloc) == space.params(start)
    err = lambda g: sum(space.error[m][lv] for m, lv in enumerate(g))
    assert err(alloc) <= err(start) + 1e-12


def test_select_keeps_the_requested_survivors_and_the_parent():
    scores = {"p": 5.0, "a": 1.0, "b": 2.0, "c": 3.0, "d": 2.0}
    assert select(scores, 2, "p") == ["a", "b", "p"]
    assert select(scores, 3, "a") == ["a", "b", "d"]


def test_a_generations_bar_counts_what_each_stage_will_score():
    # --quick: parent + 4 offspring, then the 2 kept plus (at most) the parent: 8, not 5 + 2
    assert evaluations_left(5, ((256, 512, 2), (512, 1024, 1))) == 8
    assert evaluations_left(9, ((512, 1024, 4), (1024, 2048, 2), (2048, 4096, 1))) == 9 + 5 + 3
    assert evaluations_left(2, ((1, 1, 4), (1, 1, 1))) == 4


def random_genomes(space, n, seed=0):
    rng = random.Random(seed)
    return [tuple(rng.randrange(len(c)) for c in space.cost) for _ in range(n)]


def test_materialised_model_equals_masked_model(model, db, space):
    x = token_samples(2, 32, seed=7)
    genomes = random_genomes(space, 6) + [(3, 3, 4, 0, 10, 5)]  # single heads left, a dropped MLP
    for g in genomes:
        small = materialize(model, db, g)
        masked = apply_masked(copy.deepcopy(model), db, g)  # HF's own attention with the units zeroed
        with torch.no_grad():
            assert torch.allclose(small(x).logits, masked(x).logits, atol=1e-5), g
        removed = space.total - space.params(g)
        assert module_params(model) - module_params(small) == removed


def test_materialising_and_training_a_candidate_leave_the_dense_model_untouched(model, db, space):
    from prunerzero.structured.fitness import light_train
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = materialize(model, db, space.dense)
    light_train(small, token_samples(2, 32, seed=9), lr=1e-2)
    assert not torch.equal(small.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_save_and_reload_give_identical_logits(model, db, space, tmp_path):
    g = (1, 3, 4, 2, 0, 7)
    small = materialize(model, db, g)
    save_structured(small, tmp_path / "m")
    back = load_structured(tmp_path / "m")
    loaded, _ = load_model(str(tmp_path / "m"), tokenizer=False)
    x = token_samples(2, 32, seed=3)
    with torch.no_grad():
        ref = small(x).logits
        assert torch.equal(back(x).logits, ref)
        assert torch.equal(loaded(x).logits, ref)


def tiny_run_config(tiny_dir, **kw):
    base = dict(model=str(tiny_dir), target=0.6, seqlen=32, fitness_windows=16, offspring=4, generations=3,
                stages=((32, 64, 3), (64, 128, 1)), lr=1e-3, speed=False, eval_chunks=4, threads=1)
    return DarwinConfig(**{**base, **kw})


def tiny_data():
    return DarwinData(token_samples(8, 32, 0), token_samples(16, 32, 1), token_samples(4, 32, 2))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(layers=LAYERS).save_pretrained(path)
    return path


def test_a_run_writes_its_files_and_keeps_the_parameter_count(tiny_dir, tmp_path):
    report = run_darwin(tiny_run_config(tiny_dir, eval_chunks=2, eval_full=True), tmp_path / "run", data=tiny_data(),
                        log=lambda *a: None, quiet=True)
    for f in ("config.json", "log.jsonl", "checkpoint.json", "report.json", "fitness.png", "allocation.png",
              "model/prunerzero_structure.json"):
        assert (tmp_path / "run" / f).is_file(), f
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["gen"] for r in log] == [0, 1, 2]
    for r in log:
        assert r["stages"][0]["candidates"] == 5 and r["stages"][1]["candidates"] == r["stages"][0]["survivors"]
        assert r["stages"][0]["survivors"] in (3, 4) and r["stages"][1]["survivors"] in (1, 2)
        assert r["params"] == report["params"]["prunable_kept"]
    assert set(report["genomes"]) == {"evolved", "uniform", "per-layer error"}
    assert set(report["perplexity"]) == set(report["perplexity_full"]) == {"dense", "evolved", "uniform",
                                                                            "per-layer error"}
    assert report["perplexity"]["dense"] != report["perplexity_full"]["dense"]  # 2 of 4 chunks vs all 4
    saved = load_structured(tmp_path / "run" / "model")
    assert module_params(saved) == report["params"]["model_total"]
    assert report["timings"]["database_build_s"] > 0


def _search_result(run):
    log = [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]
    return [(r["genome"], r["kl"], r["stages"]) for r in log]


def test_two_workers_and_ray_actors_score_as_one_process(tiny_dir, tmp_path):
    """A stage's candidates scored by two spawned processes, and by two Ray actors that get the
    database through the object store (as on a remote cluster), give this process's KLs."""
    runs = {"one": {}, "two": dict(workers=2)}
    for name, extra in runs.items():
        run_darwin(tiny_run_config(tiny_dir, generations=2, baselines=False, **extra), tmp_path / name,
                   data=tiny_data(), log=lambda *a: None, quiet=True)
    assert _search_result(tmp_path / "one") == _search_result(tmp_path / "two")
    ray = pytest.importorskip("ray")
    from prunerzero.runs.pools import Ray
    from prunerzero.structured.scorer import ScoreSetup, ScoreTask, Scorer
    cfg = json.loads((tmp_path / "one" / "config.json").read_text())
    data = tiny_data()
    half = len(data.fitness) // 2
    setup = ScoreSetup(str(tiny_dir), cfg["database"], data.fitness[:half], data.fitness[half:], 1e-3, threads=1)
    first = json.loads((tmp_path / "one" / "log.jsonl").read_text().splitlines()[0])
    tasks = [ScoreTask(tuple(first["genome"]), (0, 1), (2, 3), seed=7), ScoreTask(tuple(first["genome"]), (4,), (5,), 8)]
    here = [Scorer(setup)(t) for t in tasks]
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        pool = Ray(setup.inline(), 2, worker=Scorer)  # inline: the database's files, not its path
        try:
            assert pool.map(tasks) == here
        finally:
            pool.close()
    finally:
        ray.shutdown()
    assert isinstance(setup.inline().database, dict) and "meta.json" in setup.inline().database


SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")  # the run's messages
sys.path.insert(0, {tests!r})
from test_darwin import tiny_run_config, tiny_data
from prunerzero.structured.run import run_darwin
from pathlib import Path
if sys.argv[1] == "resume":
    run_darwin(resume=sys.argv[2], data=tiny_data())
else:
    run_darwin(tiny_run_config(Path({model!r}), generations=8, offspring=6), sys.argv[2], data=tiny_data())
"""


def test_a_killed_run_resumes_to_the_same_result(tiny_dir, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), model=str(tiny_dir)))
    kill_and_resume(script, tmp_path, "report.json")
    whole = json.loads((tmp_path / "whole" / "report.json").read_text())
    cut = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert cut["genomes"] == whole["genomes"]
    assert cut["perplexity"] == pytest.approx(whole["perplexity"])
    log = (tmp_path / "cut" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["gen"] for x in log] == list(range(8))


def test_bad_targets_and_models_are_clear_errors(space, tmp_path):
    with pytest.raises(StructureError, match="unreachable"):
        space.target_params(10 ** 9)
    with pytest.raises(SettingsError, match="target"):
        DarwinConfig(target=0)
    with pytest.raises(DarwinConfigError, match="survivors"):
        DarwinConfig(stages=((512, 1024, 4), (512, 1024, 6)))
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(StructureError, match="structured pruning supports Llama"):
        anatomy(gpt2)
    r = CliRunner().invoke(main, ["darwin", "--output", str(tmp_path / "r"), "--stages", "1:2"])
    assert r.exit_code == 2 and "survivors" in r.output


def test_quick_fills_the_options_not_given_and_explicit_ones_win(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from prunerzero.cli import main
    from prunerzero.structured import run
    from prunerzero.structured.config import QUICK
    seen = []
    monkeypatch.setattr(run, "run_darwin", lambda cfg, output, **kw: seen.append(cfg))
    monkeypatch.delenv("PRUNERZERO_DATA_DIR", raising=False)  # --data-dir's environment default
    r = CliRunner().invoke(main, ["darwin", "--quick", "--generations", "5", "--output", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    cfg = seen[0]
    assert cfg.generations == 5  # given: wins over the preset
    for name in ("nsamples", "offspring", "stages", "fitness_windows", "eval_chunks"):
        assert getattr(cfg, name) == QUICK[name] != getattr(run.DarwinConfig(), name)
    CliRunner().invoke(main, ["darwin", "--output", str(tmp_path / "s")])
    assert seen[1] == run.DarwinConfig()  # without --quick: the defaults
