"""Zero-shot evaluation through lm-eval (issue 15): the offline last-word task, a small local
task on the tiny model, and clear refusals."""
import json
import random
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from prunerzero import zeroshot   # noqa: E402
from prunerzero.loading import load_model   # noqa: E402

from tiny import WORDS, tiny_llama, word_tokenizer   # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache (so one lm-eval task index, about 10 s to build) for the module's tests."""
    import os
    path, saved = tmp_path_factory.mktemp("zs-cache"), os.environ.get("PRUNERZERO_CACHE")
    os.environ["PRUNERZERO_CACHE"] = str(path)
    yield path
    if saved is None:
        del os.environ["PRUNERZERO_CACHE"]
    else:
        os.environ["PRUNERZERO_CACHE"] = saved


@pytest.fixture(scope="module")
def include(tmp_path_factory):
    return local_task(tmp_path_factory.mktemp("zs-tasks") / "tasks")


def test_the_offline_task_is_built_the_same_every_time(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNERZERO_CACHE", str(tmp_path / "first"))
    summaries = zeroshot._summaries()
    docs = zeroshot.lastword_passages(summaries)
    assert len(docs) == zeroshot.PASSAGES and docs == zeroshot.lastword_passages(summaries)
    for d in docs:
        assert 39 <= len(d["context"].split()) <= 149
        assert d["target"].lower() in d["context"].lower() and d["target"].isascii()
        assert not d["context"].endswith(" ")
    first = zeroshot.task_folder()
    data = (first / f"{zeroshot.OFFLINE_TASK}.jsonl").read_bytes()
    assert [json.loads(line) for line in data.decode().splitlines()] == docs
    monkeypatch.setenv("PRUNERZERO_CACHE", str(tmp_path / "other"))
    assert (zeroshot.task_folder() / f"{zeroshot.OFFLINE_TASK}.jsonl").read_bytes() == data


def local_task(folder):
    """A 12-document multiple-choice task over the tiny tokenizer's words."""
    rng = random.Random(0)
    folder.mkdir()
    with open(folder / "docs.jsonl", "w") as f:
        for _ in range(12):
            choices = rng.sample(WORDS, 3)
            f.write(json.dumps({"context": " ".join(rng.sample(WORDS, 6)), "choices": choices,
                                "label": rng.randrange(3)}) + "\n")
    (folder / "tiny_choice.yaml").write_text(f"""task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(folder / "docs.jsonl"))}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return str(folder)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-zs")
    tiny_llama().save_pretrained(path)
    word_tokenizer(False).save_pretrained(path)
    return str(path)


def test_lm_eval_runs_on_the_in_memory_model(cache, tiny_model_dir, include):
    model, tok = load_model(tiny_model_dir, device="cpu")
    first = zeroshot.run_tasks(model, tok, ["tiny_choice"], include_path=include)
    r = first["tiny_choice"]
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "documents"} <= set(r)
    assert 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1 and r["documents"] == 12
    assert zeroshot.run_tasks(model, tok, ["tiny_choice"], include_path=include) == first
    assert "tiny_choice" in zeroshot.table(first)


def test_unknown_and_unreachable_tasks_are_refused_clearly(cache, tiny_model_dir, include, monkeypatch):
    model, tok = load_model(tiny_model_dir, device="cpu")
    with pytest.raises(zeroshot.ZeroShotError, match="unknown task.*wiki_lastword"):
        zeroshot.run_tasks(model, tok, ["no_such_task"], include_path=include)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(zeroshot.ZeroShotError, match="cannot be reached; offline, use wiki_lastword"):
        zeroshot.run_tasks(model, tok, ["arc_easy"], limit=2, include_path=include)


def test_eval_cli_prints_the_zero_shot_table(cache, tiny_model_dir, include, tmp_path):
    from click.testing import CliRunner
    from prunerzero.cli import main
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(random.Random(1).choice(WORDS) for _ in range(400)))
    r = CliRunner().invoke(main, ["eval", "--model", tiny_model_dir, "--seqlen", "32", "--eval-data", str(text),
                                  "--tasks", "tiny_choice", "--include-path", include])
    assert r.exit_code == 0, r.output
    assert "perplexity:" in r.output and "tiny_choice" in r.output
    bad = CliRunner().invoke(main, ["eval", "--model", tiny_model_dir, "--seqlen", "32", "--eval-data", str(text),
                                    "--tasks", "nope", "--include-path", include])
    assert bad.exit_code == 2 and "unknown task(s) nope" in bad.output and "Traceback" not in bad.output


def test_apply_puts_the_pruned_models_accuracies_in_its_report(cache, tiny_model_dir, include, tmp_path):
    from click.testing import CliRunner
    from prunerzero.cli import main
    text = tmp_path / "t.txt"
    text.write_text(" ".join(random.Random(2).choice(WORDS) for _ in range(600)))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["apply", "--model", tiny_model_dir, "--metric", "wanda", "--seqlen", "32",
                                  "--nsamples", "2", "--calibration", str(text), "--eval-data", str(text),
                                  "--eval-chunks", "2", "--output", str(out), "--eval-tasks", "tiny_choice",
                                  "--include-path", include, "--limit", "6"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["zero_shot"]["tiny_choice"]["documents"] == 6
    assert report["settings"]["tasks"] == ["tiny_choice"] and report["settings"]["task_limit"] == 6
    assert json.loads((out / "config.json").read_text())["use_cache"] is True


def test_lm_eval_loads_a_darwin_model_by_path_with_stock_transformers(cache, include, tmp_path):
    """lm-eval's own loader (HFLM with a path) runs a saved structured model through its
    modeling_prunerzero.py, and scores it as the in-library model scores."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from prunerzero.structured.database import build_database
    from prunerzero.structured.shrink import materialize, save_structured
    from lm_eval.tasks import TaskManager
    from prunerzero.zeroshot import _task_manager
    from tiny import token_samples
    model = tiny_llama()
    db = build_database(model, token_samples(8, 32), tmp_path / "db", {"t": 1}, progress=False)
    small = materialize(model, db, (4, 1, 2, 0))   # block 0 without attention, block 1 a level down
    tok = word_tokenizer(False)
    save_structured(small, tmp_path / "m", tok)
    by_path = HFLM(pretrained=str(tmp_path / "m"), trust_remote_code=True, device="cpu", batch_size=4)
    manager = _task_manager(TaskManager, (str(zeroshot.task_folder().resolve()), str(Path(include).resolve())))
    out = lm_eval.simple_evaluate(model=by_path, tasks=["tiny_choice"], task_manager=manager, bootstrap_iters=0)
    in_library = zeroshot.run_tasks(small, tok, ["tiny_choice"], include_path=include)
    assert out["results"]["tiny_choice"]["acc,none"] == in_library["tiny_choice"]["acc"]
