"""A run folder received from elsewhere is data: resuming it never runs code it holds (lm-eval
`!function` tasks), never writes where it says (a `../` database), never uses settings edited
after the run wrote them, and never takes options on the command line that would change the run."""
import json
import shlex

import pytest
from click.testing import CliRunner

from prunerzero.cli import main
from prunerzero.runs.checkpoint import CheckpointError
from prunerzero.runs.rundir import SUM, RunDir, settings_digest
from prunerzero.structured.run import resumed_config

EVIL_TASK = """task: evil_task
dataset_path: json
output_type: multiple_choice
doc_to_text: !function evil.doc_to_text
doc_to_target: 0
doc_to_choice: ["a", "b"]
"""


def darwin_run(tmp_path, **settings):
    """A darwin run folder as an attacker would hand it over: a valid checksum over their settings."""
    run = RunDir(tmp_path / "run", "darwin")
    run.create(dict(dict(model=str(tmp_path / "no-model")), **settings))
    run.save_checkpoint({"gen": 1})
    run.release()
    return run.path


def plant_task(folder, marker):
    tasks = folder / "tasks"
    tasks.mkdir()
    (tasks / "evil.yaml").write_text(EVIL_TASK)
    (tasks / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                   "def doc_to_text(doc):\n    return ''\n")
    return tasks


def test_a_planted_function_task_is_never_taken_from_a_run_folder(tmp_path):
    marker = tmp_path / "pwned"
    path = darwin_run(tmp_path, tasks=["evil_task"], include_path=None)
    tasks = plant_task(path, marker)
    # the settings name the task folder, and the checksum agrees (the sender wrote both)
    config = json.loads((path / "config.json").read_text())
    config["include_path"] = str(tasks)
    config[SUM] = settings_digest(config)
    (path / "config.json").write_text(json.dumps(config))
    c = resumed_config(RunDir(path, "darwin"), {})
    assert c.include_path is None and c.tasks == ("evil_task",)
    # lm-eval, asked for the task without that folder, does not know it: nothing ran
    pytest.importorskip("lm_eval")
    from prunerzero.zeroshot import check_tasks
    with pytest.raises(Exception, match="evil_task"):
        check_tasks(["evil_task"], None)
    assert not marker.exists()


def test_the_users_own_include_path_is_taken_from_the_command_line_only(tmp_path):
    path = darwin_run(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    assert resumed_config(RunDir(path, "darwin"), {"include_path": str(mine)}).include_path == str(mine)


@pytest.mark.parametrize("where", ["../elsewhere/db", "/tmp/../{tmp}/outside/db"])
def test_a_database_outside_the_run_and_the_cache_is_refused_and_nothing_is_written(tmp_path, where):
    path = darwin_run(tmp_path, database=where.format(tmp=tmp_path))
    r = CliRunner().invoke(main, ["darwin", "--resume", str(path)])
    assert r.exit_code == 2 and "outside the run folder and the cache" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "outside").exists()
    assert not (path.parent / "elsewhere").exists()


def test_a_database_outside_can_be_confirmed_by_naming_it(tmp_path):
    db = tmp_path / "my-db"
    path = darwin_run(tmp_path, database=str(db))
    assert resumed_config(RunDir(path, "darwin"), {"database": str(db)}).database == str(db)
    with pytest.raises(CheckpointError, match="confirm it with --database"):
        resumed_config(RunDir(path, "darwin"), {"database": str(tmp_path / "other")})


def test_a_symlink_inside_the_run_folder_pointing_out_is_outside(tmp_path):
    (tmp_path / "target").mkdir()
    path = darwin_run(tmp_path, database="PLACEHOLDER")
    (path / "db").symlink_to(tmp_path / "target")
    config = json.loads((path / "config.json").read_text())
    config["database"] = str(path / "db")
    config[SUM] = settings_digest(config)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="outside the run folder"):
        resumed_config(RunDir(path, "darwin"), {})


@pytest.mark.parametrize("command, field, value", [("evolve", "sparsity", 0.9), ("evolve", "model", "gpt2"),
                                                   ("darwin", "target", 0.3), ("darwin", "tasks", ["arc_easy"])])
def test_an_edited_config_is_refused_before_anything_loads(tmp_path, command, field, value):
    run = RunDir(tmp_path / "run", command)
    run.create({"model": str(tmp_path / "no-model"), "sparsity": 0.5, "target": 0.6, "tasks": []})
    run.save_checkpoint({"gen": 1})
    run.release()
    config = json.loads((run.path / "config.json").read_text())
    config[field] = value
    (run.path / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(main, [command, "--resume", str(run.path)])
    assert r.exit_code == 2 and "fails its checksum" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("command, typed, allowed", [
    ("evolve", "--sparsity 0.6", False), ("evolve", "--structure 2:4", False), ("evolve", "--seed 3", False),
    ("evolve", "--model gpt2", False), ("evolve", "--update admm", False),
    ("darwin", "--target-params 0.5", False), ("darwin", "--quick", False), ("darwin", "--seed 1", False),
    ("evolve", "--time-limit 60", True), ("evolve", "--generations 30", True), ("evolve", "--workers 2", True),
    ("darwin", "--threads 1", True)])
def test_resume_refuses_options_that_would_change_the_run(tmp_path, command, typed, allowed):
    run = RunDir(tmp_path / "run", command)
    run.create({"model": str(tmp_path / "no-model")})
    run.save_checkpoint({"gen": 1})
    run.release()
    r = CliRunner().invoke(main, [command, "--resume", str(run.path), *shlex.split(typed)])
    option = typed.split()[0]
    assert r.exit_code == 2
    if allowed:   # accepted; the run then fails on its (absent) model, not on the option
        assert "cannot be given with --resume" not in r.output and "no model folder" in r.output, r.output
    else:
        assert f"{option} cannot be given with --resume" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
