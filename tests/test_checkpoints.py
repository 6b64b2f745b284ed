"""Run folders are data, not code: checkpoints are checksummed JSON, a planted pickle is never
loaded, and a damaged, edited or foreign checkpoint is a one-line error before any work."""
import json
import pickle

import pytest
from click.testing import CliRunner

from prunerzero.cli import main
from prunerzero.runs.checkpoint import CheckpointError, decode, encode
from prunerzero.runs.rundir import RunDir


class Planted:
    """Unpickling this runs a shell command that writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def run_folder(tmp_path, kind="evolve", state=None):
    run = RunDir(tmp_path / "run", kind)
    run.create({"model": str(tmp_path / "no-such-model")})
    if state is not None:
        run.save_checkpoint(state)
    run.release()  # the run that wrote it has ended
    return run.path


def resume(kind, path):
    return CliRunner().invoke(main, [kind, "--resume", str(path)])


@pytest.mark.parametrize("kind", ["evolve", "darwin"])
def test_a_planted_pickle_is_never_loaded(tmp_path, kind):
    path = run_folder(tmp_path, kind)
    marker = tmp_path / "pwned"
    (path / "checkpoint.pkl").write_bytes(pickle.dumps(Planted(marker)))
    r = resume(kind, path)
    assert r.exit_code == 2 and "pickle" in r.output and "never loaded" in r.output, r.output
    assert not marker.exists()


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[: len(raw) // 2], "damaged"),
    (lambda raw: b"\xff\xfe" + raw, "damaged"),
    (lambda raw: raw.replace(b'"gen": 3', b'"gen": 4'), "checksum"),
    (lambda raw: b"[]", "not a prunerzero checkpoint"),
    (lambda raw: b"", "damaged"),
])
def test_damaged_or_edited_checkpoints_are_one_line_errors_before_any_work(tmp_path, damage, message):
    path = run_folder(tmp_path, state={"gen": 3, "parent": [0, 1]})
    f = path / "checkpoint.json"
    f.write_bytes(damage(f.read_bytes()))
    r = resume("evolve", path)  # the model folder does not exist: reaching it would fail differently
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_resuming_a_run_of_the_other_command_is_refused(tmp_path):
    path = run_folder(tmp_path, "evolve", state={"gen": 1})
    r = resume("darwin", path)
    assert r.exit_code == 2 and "is a `prunerzero evolve` run" in r.output
    (path / "config.json").write_text(json.dumps({"model": None}))  # an older run: its checkpoint still says so
    r = resume("darwin", path)
    assert r.exit_code == 2 and "is a `prunerzero evolve` run" in r.output


def test_a_checkpoint_round_trips_and_its_checksum_covers_the_state():
    state = {"gen": 2, "x": [1.5, float("inf")], "nested": {"a": "b"}}
    assert decode(encode("darwin", state), "darwin", "RUN") == state
    with pytest.raises(CheckpointError, match="checksum"):
        decode(encode("darwin", state).replace(b'"b"', b'"c"'), "darwin", "RUN")
