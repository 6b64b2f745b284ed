"""Messages through the `prunerzero` logger and bars through one helper (issue 15): each long
step leaves a line with its time, and quiet mode silences both."""
import logging

import pytest

from prunerzero import progress
from prunerzero.engine.evaluate import perplexity

from tiny import tiny_llama, token_samples


@pytest.fixture(autouse=True)
def loud():
    progress.set_quiet(False)
    yield
    progress.set_quiet(False)


def test_a_finished_step_leaves_one_line_with_its_time(caplog):
    caplog.set_level(logging.INFO, logger="prunerzero")
    perplexity(tiny_llama(), token_samples(3, 16), batch_size=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "prunerzero"]
    assert len(lines) == 1 and lines[0].startswith("perplexity: 3 steps in ") and lines[0].endswith(" s")


def test_quiet_mode_and_disabled_bars_leave_nothing(caplog):
    caplog.set_level(logging.INFO, logger="prunerzero")
    perplexity(tiny_llama(), token_samples(2, 16), progress=False)
    progress.set_quiet(True)
    perplexity(tiny_llama(), token_samples(2, 16))
    progress.log("an info message")
    assert not [r for r in caplog.records if r.name == "prunerzero"]
    progress.logger.warning("a warning still shows")
    assert [r.getMessage() for r in caplog.records] == ["a warning still shows"]


def test_the_cli_sends_step_lines_to_stderr_and_results_to_stdout(tiny_dir, tmp_path):
    from click.testing import CliRunner
    from prunerzero.cli import main
    from tiny import WORDS, word_tokenizer
    import random
    word_tokenizer(False).save_pretrained(tiny_dir)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(random.Random(0).choice(WORDS) for _ in range(400)))
    r = CliRunner().invoke(main, ["eval", "--model", str(tiny_dir), "--seqlen", "32", "--eval-data", str(text)])
    assert r.exit_code == 0, r.output
    assert "perplexity: " in r.stdout and "steps in" in r.stderr and "steps in" not in r.stdout


def test_quiet_mode_silences_transformers_bars_and_leaving_it_gives_back_their_setting(tiny_dir, tmp_path, capfd):
    from transformers.utils import logging as hf_logging
    from prunerzero.engine.models import load_pretrained
    import torch
    for before in (True, False):
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()
        progress.set_quiet(True)
        model = load_pretrained(str(tiny_dir), "fp32", torch.device("cpu"))
        model.save_pretrained(tmp_path / f"saved{before}")
        err = capfd.readouterr().err
        assert "Loading weights" not in err and "Writing model shards" not in err
        progress.set_quiet(False)
        assert hf_logging.is_progress_bar_enabled() == before
    hf_logging.enable_progress_bar()
    with progress.silenced():
        load_pretrained(str(tiny_dir), "fp32", torch.device("cpu"))
    assert "Loading weights" not in capfd.readouterr().err and hf_logging.is_progress_bar_enabled()
    load_pretrained(str(tiny_dir), "fp32", torch.device("cpu"))
    assert "Loading weights" in capfd.readouterr().err


def test_a_run_functions_callback_reaches_the_steps_it_calls_and_no_further(caplog, tmp_path, monkeypatch):
    """say() goes to the innermost saying()'s callback (None there keeps the outer one), to
    the logger outside any; a run function's `log` reaches a cache warning deep inside it."""
    caplog.set_level(logging.INFO, logger="prunerzero")
    outer, inner = [], []
    with progress.saying(outer.append):
        progress.say("a")
        with progress.saying(inner.append):
            progress.say("b")
        with progress.saying(None):
            progress.say("c")
    progress.say("d")
    assert outer == ["a", "c"] and inner == ["b"]
    assert [r.getMessage() for r in caplog.records if r.name == "prunerzero"] == ["d"]
    from prunerzero import pipeline
    from tiny import text, word_tokenizer
    monkeypatch.setenv("PRUNERZERO_CACHE", str(tmp_path / "cache"))
    tiny_llama().save_pretrained(tmp_path / "m")
    word_tokenizer(True).save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text("\n".join(text(300, s) for s in range(4)))
    common = dict(model=str(tmp_path / "m"), metric="abs(W)*G", sparsity=0.5, calibration=str(tmp_path / "t.txt"),
                  eval_data=str(tmp_path / "t.txt"), seqlen=16, nsamples=2, eval_chunks=1)
    pipeline.run_apply(log=lambda line: None, **common)
    for path in (tmp_path / "cache" / "primitives").iterdir():
        path.write_bytes(b"damaged")
    lines = []
    pipeline.run_apply(log=lines.append, **common)
    assert any("WARNING: the cached G primitives" in line for line in lines)
