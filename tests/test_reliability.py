"""Bad input and faults, tried as a hostile new user would, against the command line on a tiny
model: every case ends in one clear line that names the problem, exit status 2 (130 for an
interrupt), no traceback, and nothing half-written left behind. docs/reliability.md's
section counts these cases."""
import json
import shlex

import pytest
from click.testing import CliRunner
from transformers import PreTrainedTokenizerFast

from prunerzero import pipeline
from prunerzero.cli import main

from tiny import text, tiny_llama, word_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny Llama (64 positions) with a real tokenizer, a text, a binary file, a model
    folder with truncated weights and one whose config does not match its weights."""
    root = tmp_path_factory.mktemp("world")
    model = tiny_llama()
    for name in ("m", "truncated", "mismatch"):
        model.save_pretrained(root / name)
        word_tokenizer(True).save_pretrained(root / name)
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    cfg = json.loads((root / "mismatch" / "config.json").read_text())
    (root / "mismatch" / "config.json").write_text(json.dumps(dict(cfg, hidden_size=96)))
    (root / "t.txt").write_text("\n".join(text(300, s) for s in range(8)))
    (root / "bin.txt").write_bytes(bytes(range(256)) * 40)
    (root / "a-file").write_text("not a folder")
    return root


def base(w, out="out"):
    return (f"--model {w}/m --calibration {w}/t.txt --eval-data {w}/t.txt --seqlen 16 --nsamples 2 "
            f"--eval-chunks 2 --output {w}/{out}")


SEARCH = "--model {w}/m --calibration {w}/t.txt --seqlen 16 --nsamples 2 --output {w}/run"
DARWIN = SEARCH + " --eval-data {w}/t.txt --offspring 2 --stages 16:32:2,32:64:1"

# (command line after `prunerzero`, a fragment of the one-line error). {w}: the world folder.
CASES = [
    # apply: ranges and conflicts, refused before any model is loaded
    ("apply {base} --eval-chunks 0", "--eval-chunks must be at least 1"),
    ("apply {base} --eval-chunks -3", "--eval-chunks must be at least 1"),
    ("apply {base} --nsamples 0", "--nsamples must be at least 1"),
    ("apply {base} --nsamples -1", "--nsamples must be at least 1"),
    ("apply {base} --seqlen 0", "--seqlen must be at least 2"),
    ("apply {base} --seqlen 1", "--seqlen must be at least 2"),
    ("apply {base} --seqlen 100", "longer than the 64 positions"),
    ("apply {base} --sparsity nan", "--sparsity must be in [0, 1)"),
    ("apply {base} --sparsity 1.0", "--sparsity must be in [0, 1)"),
    ("apply {base} --sparsity -0.1", "--sparsity must be in [0, 1)"),
    ("apply {base} --structure 2:4 --sparsity 0.9", "contradicts it"),
    ("apply {base} --structure 4:2", "N:M needs 0 < N < M"),
    ("apply {base} --structure 2:3", "needs input widths divisible by 3"),
    ("apply {base} --structure half", "--structure must be 'unstructured' or 'N:M'"),
    ("apply {base} --seed -1", "--seed must be at least 0"),
    ("apply {base} --method sparsegpt --update admm", "--method sparsegpt has its own"),
    ("apply {base} --update 'admm iters=0'", "--update iters must be at least 1"),
    ("apply {base} --update 'admm correct=0.2 dense_windows=-2'", "--update dense_windows must be at least 0"),
    ("apply {base} --update 'admm lr=3'", "'lr=3' is not a parameter=value"),
    ("apply {base} --structure 2:4 --allocation owl", "N:M keeps one pattern in every layer"),
    ("apply {base} --structure 2:4 --allocation search", "N:M keeps one pattern in every layer"),
    ("apply {base} --allocation search --allocation-generations 0", "--allocation-generations"),
    ("apply {base} --device cuda", "CUDA is not available"),
    ("apply {base} --device cuda:7", "CUDA is not available"),
    ("apply {base} --device foo", "--device must be auto, cpu, cuda"),
    # apply: files and folders
    ("apply {base} --eval-data {w}/bin.txt", "is not UTF-8 text"),
    ("apply {base} --calibration {w}/bin.txt", "is not UTF-8 text"),
    ("apply {base} --eval-data {w}/none.txt", "no such file"),
    ("apply {base} --calibration {w}", "is a folder"),
    ("apply {base} --output {w}/a-file", "is a file, not a folder"),
    ("apply {base} --output {w}/a-file/sub", "is a file, so the folder cannot be created"),
    ("apply {base} --output ''", "--output must name a folder"),
    ("apply {base} --output /proc/prunerzero-out", "cannot write in /proc"),
    ("apply {base} --output {w}", "exists and is not empty"),
    ("apply {base} --model {w}/none", "no model folder at"),
    ("apply {base} --model {w}/truncated", "cannot load model"),
    ("apply {base} --model {w}/mismatch", "cannot load model"),
    # metrics the language refuses, before any model is loaded
    ("apply {base} --metric 'W**(1/0)'", "the exponent of ** must lie in [-64, 64]"),
    ("apply {base} --metric '1e309*W'", "number 1e309 is out of range"),
    ("apply {base} --metric 'W**-1e309'", "number 1e309 is out of range"),
    ("apply {base} --metric '1e-400*W'", "number 1e-400 is out of range"),
    ("apply {base} --metric '1e300*1e300*W'", "beyond what a float holds"),
    ("apply {base} --metric 'W*1j'", "only real numbers"),
    ("apply {base} --metric X*G", "does not depend on W"),
    ("apply {base} --metric 'abs(W'", "unbalanced parentheses"),
    ("simplify " + "+".join(["W"] * 3000), "nested more than 100 levels"),
    ("simplify " + "abs(" * 1000 + "W" + ")" * 1000, "nested more than 100 levels"),
    ("simplify " + "W*" * 6000 + "W", "too long"),
    # eval
    ("eval --model {w}/m --eval-data {w}/t.txt --seqlen 0", "--seqlen must be at least 2"),
    ("eval --model {w}/m --eval-data {w}/t.txt --eval-chunks 0", "--eval-chunks must be at least 1"),
    ("eval --model {w}/m --eval-data {w}/bin.txt --seqlen 16", "is not UTF-8 text"),
    ("eval --model {w}/truncated --eval-data {w}/t.txt --seqlen 16", "SafetensorError"),
    ("eval --model {w}/m --eval-data {w}/t.txt --seqlen 16 --dtype fp8", "Invalid value for '--dtype'"),
    # evolve
    ("evolve " + SEARCH + " --structure 2:3", "needs input widths divisible by 3"),
    ("evolve " + SEARCH + " --structure 2:4 --sparsity 0.9", "contradicts it"),
    ("evolve " + SEARCH + " --nsamples 0", "--nsamples must be at least 1"),
    ("evolve " + SEARCH + " --stages 1 --update admm", "--proxy-stages 1 leaves no stage scored with --update admm"),
    ("evolve " + SEARCH + " --seqlen 100", "longer than the 64 positions"),
    ("evolve " + SEARCH + " --time-limit -1", "--time-limit must be > 0"),
    ("evolve " + SEARCH + " --heldout-chunks 0", "--heldout-chunks must be at least 1"),
    ("evolve " + SEARCH + " --threads 0", "--threads must be at least 1"),
    ("evolve " + SEARCH + " --population 1", "--population must be at least 2"),
    ("evolve " + SEARCH + " --elite 20", "--elite must be between 0 and 19"),
    ("evolve " + SEARCH + " --promote 0", "--promote must be in (0, 1]"),
    ("evolve " + SEARCH + " --stages 4,1", "--stages must be increasing"),
    ("evolve " + SEARCH + " --stages a,b", "--stages must be comma-separated whole numbers"),
    ("evolve " + SEARCH + " --seed-metrics nonsense", "unknown terminal 'nonsense'"),
    ("evolve " + SEARCH + " --search-data {w}/bin.txt", "is not UTF-8 text"),
    ("evolve " + SEARCH + " --device foo", "--device must be auto"),
    ("evolve --model {w}/m --output ''", "give --output RUN"),
    ("evolve --resume {w}/nothing", "is not a run folder"),
    # darwin
    ("darwin " + DARWIN + " --target-params 1.5", "a fraction in (0, 1] or a whole count"),
    ("darwin " + DARWIN + " --target-params nan", "--target-params must be a finite number"),
    ("darwin " + DARWIN + " --target-params inf", "--target-params must be a finite number"),
    ("darwin " + DARWIN + " --target-params 0", "--target-params must be > 0"),
    ("darwin " + DARWIN + " --target-params 1000000000", "more than the model's"),
    ("darwin " + DARWIN + " --eval-chunks 0", "--eval-chunks must be at least 1"),
    ("darwin " + DARWIN + " --ladder a,b", "--ladder must be comma-separated numbers"),
    ("darwin " + DARWIN + " --ladder 0,2", "--ladder fractions must lie in [0, 1]"),
    ("darwin " + DARWIN + " --lr nan", "--lr must be a finite number"),
    ("darwin " + DARWIN + " --multiple 0", "--multiple must be at least 1"),
    ("darwin " + DARWIN + " --stages 1:2", "each stage needs"),
    ("darwin " + DARWIN + " --finetune-tokens -1", "--finetune-tokens must be at least 0"),
    ("darwin " + DARWIN + " --seqlen 100", "longer than the 64 positions"),
    ("darwin --resume {w}/nothing", "is not a run folder"),
]


def run(line: str, w):
    args = shlex.split(line.format(w=w, base=base(w)))
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize("line, message", CASES, ids=[c[0][:60] for c in CASES])
def test_a_users_mistake_is_one_clear_line_exit_2_and_nothing_written(world, line, message):
    r = run(line, world)
    assert r.exception is None or isinstance(r.exception, SystemExit), f"traceback: {r.exception!r}"
    assert r.exit_code == 2, r.output
    errors = [x for x in r.output.splitlines() if x.lower().startswith("error")]
    assert len(errors) == 1 and message in errors[0], r.output
    assert "Traceback" not in r.output
    for leftover in ("out", "out.partial", "run"):
        assert not (world / leftover).exists(), leftover


def test_hex_and_binary_integers_are_read_as_python_reads_them():
    r = CliRunner().invoke(main, ["simplify", "0x10*W + 0b11*X"])
    assert r.exit_code == 0, r.output
    assert "simplified: 16*W + 3*X" in r.output


def test_an_interrupted_apply_says_nothing_was_saved_and_leaves_no_partial(world, monkeypatch, tmp_path):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", interrupted)  # mid-save: weights written
    out = tmp_path / "out"
    r = CliRunner().invoke(main, shlex.split("apply " + base(world).replace(f"{world}/out", str(out))))
    assert r.exit_code == 130, r.output
    assert "interrupted; nothing was saved" in r.output and "evolve" not in r.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "prunerzero" in p.name]


def test_a_search_interrupted_before_its_run_folder_says_to_run_again(world, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("prunerzero.search.run.load_model", interrupted)
    r = CliRunner().invoke(main, shlex.split("evolve " + SEARCH.format(w=world)))
    assert r.exit_code == 130
    assert f"no run was written to {world}/run yet; run the same command again" in r.output
    assert "--resume" not in r.output


@pytest.mark.parametrize("command, config", [
    ("evolve", {"stages": 5}), ("evolve", {"population": "many"}), ("evolve", {"seqlen": None}),
    ("darwin", {"stages": 5}), ("darwin", {"ladder": "x"}), ("darwin", {"seqlen": None})])
def test_a_hand_edited_run_config_is_one_line_error(tmp_path, command, config):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dict(config, run_kind=command)))
    r = CliRunner().invoke(main, [command, "--resume", str(run)])
    assert r.exit_code == 2 and r.output.startswith("error: "), r.output
    assert len(r.output.strip().splitlines()) == 1


def test_settings_beside_a_config_are_refused_not_ignored():
    from prunerzero.apply_config import ApplyConfig, EvalConfig
    from prunerzero.checks import SettingsError
    with pytest.raises(SettingsError, match="not both"):
        pipeline.run_apply(ApplyConfig(), sparsity=0.6)
    with pytest.raises(SettingsError, match="not both"):
        pipeline.run_eval(EvalConfig(), eval_chunks=2)


def test_the_interrupt_hint_names_what_actually_continues_the_work(tmp_path):
    from prunerzero.cli import _resume_hint
    run = tmp_path / "run"
    hint = _resume_hint("darwin", str(run), "the database levels")
    assert "no run was written" in hint() and "--resume" not in hint() and "database levels" in hint()
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert f"prunerzero darwin --resume {run}" in hint()   # decided when Ctrl-C comes, not at start
