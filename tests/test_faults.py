"""Fault injection on the save path and on run folders: a full disk, a read-only file system,
symlinked, dangling and looping outputs, two writers at once, SIGTERM during a save and during a
search, a user's own `OUT.partial`. Each ends in one line and exit 2 (143 for SIGTERM), leaves
nothing half-written, and touches nothing of the user's."""
import errno
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from prunerzero import pipeline
from prunerzero.cli import main
from prunerzero.runs.output import MARKER, Output
from prunerzero.runs.rundir import RunDir

from helpers import search_script, start_held, wait_for
from tiny import saved_world, tiny_llama

pytestmark = pytest.mark.usefixtures("own_cache")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return saved_world(tmp_path_factory.mktemp("faults"))


def apply_args(w, out) -> list[str]:
    return shlex.split(f"apply --model {w}/m --calibration {w}/t.txt --eval-data {w}/t.txt --seqlen 16 "
                       f"--nsamples 2 --eval-chunks 2 --metric wanda --output {out}")


def one_error(r, fragment: str):
    assert r.exit_code == 2, r.output
    errors = [x for x in r.output.splitlines() if x.startswith("error")]
    assert len(errors) == 1 and fragment in errors[0], r.output
    assert "Traceback" not in r.output


def leftovers(folder: Path) -> list[str]:
    """Anything a save may have left beside its output: temporary folders, lock files."""
    return sorted(p.name for p in folder.iterdir() if "prunerzero" in p.name or p.name.endswith(".partial"))


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "the disk is full"),
                                         (errno.EROFS, "the file system is read-only"),
                                         (errno.EDQUOT, "the disk quota is exceeded")])
def test_a_save_that_fails_says_nothing_was_saved_and_leaves_nothing(world, tmp_path, monkeypatch, code, words):
    from transformers import PreTrainedModel

    def fails(self, folder, *a, **k):
        (Path(folder) / "model.safetensors").write_bytes(b"half")   # some bytes were written first
        raise OSError(code, os.strerror(code), str(Path(folder) / "model.safetensors"))
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fails)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, apply_args(world, out))
    one_error(r, f"nothing was saved to {out}: {words}")
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_symlink_to_an_empty_folder_is_saved_into_that_folder(world, tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    r = CliRunner().invoke(main, apply_args(world, tmp_path / "link"))
    assert r.exit_code == 0, r.output
    assert (target / "report.json").is_file() and (tmp_path / "link").is_symlink()
    assert leftovers(tmp_path) == []
    assert oct((target / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert oct(target.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _link_to_full(p: Path):
    (p.parent / "full").mkdir()
    (p.parent / "full" / "x").write_text("x")
    p.symlink_to(p.parent / "full")


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.symlink_to(p.parent / "nowhere"), "which does not exist"),
    (lambda p: p.symlink_to(p), "symlink loop"),
    (lambda p: _link_to_full(p), "exists and is not empty"),
])
def test_bad_symlinked_outputs_are_refused_before_any_work(world, tmp_path, monkeypatch, make, fragment):
    loaded = []
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: loaded.append(1))
    out = tmp_path / "out"
    make(out)
    r = CliRunner().invoke(main, apply_args(world, out))
    one_error(r, fragment)
    assert not loaded
    assert not (tmp_path / "nowhere").exists()


def test_a_second_writer_to_one_output_fails_at_once_and_the_first_saves(world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = Output(out).check()      # another process's apply, holding the output
    loaded = []
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: loaded.append(1))
    try:
        r = CliRunner().invoke(main, apply_args(world, out))
        one_error(r, "is being written by another prunerzero process")
        assert not loaded
        first.save(lambda folder: (folder / "report.json").write_text("{}"))
    finally:
        first.close()
    assert json.loads((out / "report.json").read_text()) == {}
    assert leftovers(tmp_path) == []


def test_two_resumes_of_one_run_folder_cannot_run_at_once(tmp_path):
    run = RunDir(tmp_path / "run", "evolve")
    run.create({"model": None})    # a run in progress in another process holds its folder
    try:
        r = CliRunner().invoke(main, ["evolve", "--resume", str(tmp_path / "run")])
        one_error(r, "is being written by another prunerzero process")
    finally:
        run.release()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json"]


def test_a_users_own_partial_folder_and_symlink_are_never_touched(world, tmp_path):
    mine = tmp_path / "out.partial"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine too")
    (tmp_path / ".out.link.prunerzero-tmp").symlink_to(elsewhere)     # looks like ours, is a link
    fake = tmp_path / ".out.abc.prunerzero-tmp"                         # looks like ours, no marker
    fake.mkdir()
    (fake / "data").write_text("x")
    dead = tmp_path / ".out.dead.prunerzero-tmp"                        # ours, from a killed run
    dead.mkdir()
    (dead / MARKER).write_text("999999999")
    r = CliRunner().invoke(main, apply_args(world, tmp_path / "out"))
    assert r.exit_code == 0, r.output
    assert (mine / "thesis.tex").read_text() == "mine" and (elsewhere / "keep.txt").read_text() == "mine too"
    assert (fake / "data").is_file() and (tmp_path / ".out.link.prunerzero-tmp").is_symlink()
    assert not dead.exists()


SAVE_SCRIPT = """
import sys, time
from pathlib import Path
import prunerzero.pipeline as p
from prunerzero.cli import main
write = p._write

def slow(model, tok, folder, result):
    model.save_pretrained(folder)           # part of the output is written
    Path(sys.argv[1]).write_text("saving")
    while True:
        time.sleep(0.05)
p._write = slow
main(sys.argv[2:], prog_name="prunerzero")
"""


def test_sigterm_during_a_save_cleans_up_like_ctrl_c(world, tmp_path):
    out, ready = tmp_path / "out", tmp_path / "ready"
    env = dict(os.environ, TQDM_DISABLE="1")
    proc = subprocess.Popen([sys.executable, "-c", SAVE_SCRIPT, str(ready), *apply_args(world, out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(ready, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped (SIGTERM); nothing was saved" in err and "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_sigterm_during_a_search_leaves_a_run_that_resumes(tmp_path):
    model = tmp_path / "tiny"
    tiny_llama().save_pretrained(model)
    script = tmp_path / "search.py"
    # the search run through the command line's handling of SIGTERM
    script.write_text(search_script(model, 4).replace(
        "if sys.argv[1] == \"resume\":", "import signal\nfrom prunerzero.cli import _on_sigterm\n"
        "signal.signal(signal.SIGTERM, _on_sigterm)\nif sys.argv[1] == \"resume\":"))
    env = dict(os.environ, PRUNERZERO_CACHE=str(tmp_path / "cache"), TQDM_DISABLE="1")
    proc, held = start_held(script, tmp_path / "run", tmp_path, 1, env)
    wait_for(held, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0 and not (tmp_path / "run" / "hall_of_fame.json").exists()
    assert leftovers(tmp_path) == []       # its lock is gone with it
    r = subprocess.run([sys.executable, str(script), "resume", str(tmp_path / "run")], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stdout and (tmp_path / "run" / "hall_of_fame.json").is_file()


def test_a_cache_that_cannot_be_written_costs_the_reuse_not_the_run(world, tmp_path, monkeypatch):
    import prunerzero.engine.calibration as calibration

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(calibration, "save_file", full)
    r = CliRunner().invoke(main, apply_args(world, tmp_path / "out") + ["--metric", "pruner-zero"])  # uses G
    assert r.exit_code == 0, r.output
    assert "could not be cached" in r.output and (tmp_path / "out" / "report.json").is_file()


def test_a_model_with_a_non_finite_perplexity_is_never_saved(world, tmp_path, monkeypatch):
    calls = []

    def broken(model, chunks, *a, **k):
        calls.append(1)
        return 30.0 if len(calls) == 1 else float("nan")      # dense fine, pruned broken
    monkeypatch.setattr(pipeline, "perplexity", broken)
    r = CliRunner().invoke(main, apply_args(world, tmp_path / "out"))
    one_error(r, "the pruned perplexity is nan")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
