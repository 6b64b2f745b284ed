"""Shared test helpers: random metrics and random layer primitives."""
import random
from pathlib import Path

import torch

UNARY = ["abs", "neg", "sqr", "sqrt", "exp", "log", "tanh", "sigmoid", "mms", "zsn", "mms_row", "zsn_row"]
BINARY = ["add", "sub", "mul", "div"]


def random_expr(rng: random.Random, depth: int = 3, terminals=("W", "G", "X")) -> str:
    """A random metric in function form, like the trees a GP search produces."""
    if depth == 0 or rng.random() < 0.25:
        return rng.choice(list(terminals) + ["0.5", "2"]) if rng.random() < 0.9 else rng.choice(terminals)
    if rng.random() < 0.5:
        return f"{rng.choice(UNARY)}({random_expr(rng, depth - 1, terminals)})"
    return f"{rng.choice(BINARY)}({random_expr(rng, depth - 1, terminals)}, {random_expr(rng, depth - 1, terminals)})"


def primitives(out=16, inp=32, seed=0, dtype=torch.float64):
    """Random W, G, X of one layer, in ranges like a trained model's."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=dtype) * 0.05
    G = torch.rand(out, inp, generator=g, dtype=dtype) * 1e-3 + 1e-5
    X = torch.rand(1, inp, generator=g, dtype=dtype) * 10 + 0.1
    return {"W": W, "G": G, "X": X, "N": 32}



HOLD = """
import os, sys, time, runpy
from pathlib import Path
from prunerzero.runs.rundir import RunDir
held, at = Path(os.environ["PZ_TEST_HELD"]), int(os.environ["PZ_TEST_HOLD_GEN"])
append = RunDir.append

def holding(self, name, record):
    append(self, name, record)
    if record.get("gen") == at and not held.exists():  # mid-generation: a row written, no checkpoint
        held.write_text(str(os.getpid()))
        while True:
            time.sleep(0.05)
RunDir.append = holding
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start_held(script, run, tmp_path, gen: int, env: dict):
    """Start `script new RUN` in a process that stops, alive, right after the first log row of
    generation `gen` is written (before that generation's checkpoint); returns (process, the file
    that appears once it holds there)."""
    import subprocess
    import sys
    held = tmp_path / f"held-{Path(run).name}"
    env = dict(env, PZ_TEST_HELD=str(held), PZ_TEST_HOLD_GEN=str(gen))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(script), "new", str(run)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, held


def wait_for(path, proc, timeout: float = 300):
    """Until `path` exists; fails with the process's output if it ends first (no race with a clock:
    the deadline only bounds a hung test)."""
    import time
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before reaching the state to kill it in:\n"
                                 f"{proc.stderr.read()[-2000:]}")
        assert time.time() < deadline, "the run never reached the state to kill it in"
        time.sleep(0.02)


def kill_and_resume(script, tmp_path, finished_file: str, sig=None, lines: int = 2):
    """Run `script new whole` to the end; run `script new cut`, send it `sig` (SIGKILL by default)
    while it is held mid-generation `lines` (a log row of that generation written, its checkpoint
    not), then `script resume cut`. Returns the resume's CompletedProcess."""
    import os
    import signal
    import subprocess
    import sys
    env = dict(os.environ, PRUNERZERO_CACHE=str(tmp_path / "cache"), TQDM_DISABLE="1")
    subprocess.run([sys.executable, str(script), "new", str(tmp_path / "whole")], env=env, check=True,
                   capture_output=True)
    proc, held = start_held(script, tmp_path / "cut", tmp_path, lines, env)
    wait_for(held, proc)
    proc.send_signal(sig or signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (tmp_path / "cut" / finished_file).exists(), "the run finished before it was killed"
    r = subprocess.run([sys.executable, str(script), "resume", str(tmp_path / "cut")], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stdout
    return r


def layer_inputs(model, samples, layers) -> dict:
    """Every input row each of `layers` (name -> module) sees over the samples, one sample per
    forward: an independent record, without the library's recorders."""
    xs = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: xs.setdefault(n, []).append(i[0].reshape(-1, i[0].shape[-1])))
             for n, m in layers.items()]
    with torch.no_grad():
        for s in samples:
            model(s[None])
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in xs.items()}


def search_script(model, generations: int, **extra) -> str:
    """A script for kill_and_resume: `script new RUN` starts a search on the tiny model saved at
    `model` (SearchConfig settings `extra` on top of small defaults), `script resume RUN` resumes it."""
    from pathlib import Path
    settings = dict(model=str(model), population=8, generations=generations, elite=1, stages=(1, 2, 4),
                    promote=0.5, heldout_chunks=4, hof_size=3, threads=1, seed=3, **extra)
    return f"""
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")  # the run's messages
sys.path.insert(0, {str(Path(__file__).parent)!r})
from tiny import search_data
from prunerzero.search.config import SearchConfig
from prunerzero.search.run import run_evolve
if sys.argv[1] == "resume":
    run_evolve(resume=sys.argv[2], data=search_data())
else:
    run_evolve(SearchConfig(**{settings!r}), sys.argv[2], data=search_data())
"""


def recipe_config(tiny_dir, **kw):
    """SearchConfig of a small recipe search (ADMM) on the tiny model saved at `tiny_dir`."""
    from prunerzero.search.config import SearchConfig
    base = dict(model=str(tiny_dir), population=8, generations=2, elite=1, stages=(1, 2, 4), promote=0.5,
                heldout_chunks=4, hof_size=3, threads=1, update="admm")
    return SearchConfig(**{**base, **kw})


def evaluations(run):
    """The rows of RUN/evaluations.jsonl."""
    import json
    from pathlib import Path
    return [json.loads(line) for line in (Path(run) / "evaluations.jsonl").read_text().splitlines()]
