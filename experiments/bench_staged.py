"""The three walks of a staged recipe (`staged=1`), alternated in one process beside SparseGPT:

- lockstep: the pruned stream runs once per block, every batch halted before each stage
  (stages.prune_in_lockstep); with `correct=`, the dense stream's layer inputs come from the
  one dense pass that passes it on (stages.run_storing);
- stored: a pass of the pruned stream per stage, the dense inputs replayed from that store
  (what a block over stages.LOCKSTEP_BYTES does);
- a pass per stage: the dense half of each stage run as a pass of its own too (a block over
  stages.DENSE_STORE_BYTES).

The default model pruned with --recipe from --nsamples x 512 Wikipedia tokens, --repeats times
each way; the pruned weights of the ways compared; prune times as ratios to SparseGPT's (its
reference walk: a recording pass and an output pass per block) and to --compare recipes (their
own walks) measured in the same process.

    python experiments/bench_staged.py [--recipe evolved-recipe-2of4] [--structure 2:4] [--nsamples 32]
        [--update "admm correct=0.2 staged=1"] [--compare sqrtx-admm] [--ways lockstep,stored,passes]

Writes results/bench_staged[-NAME].{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from common import common_options
from prunerzero import apply_metric, apply_sparsegpt
from prunerzero.engine import stages
from prunerzero.loading import load_model
from prunerzero.pipeline import calibration_for

# (LOCKSTEP_BYTES, DENSE_STORE_BYTES) of each way
WAYS = {"lockstep": (stages.LOCKSTEP_BYTES, stages.DENSE_STORE_BYTES),
        "stored": (0, stages.DENSE_STORE_BYTES),
        "passes": (0, 0)}


def prune_once(model, dense, args, samples, how):
    """Prune the dense model one way; (seconds, report, weights)."""
    model.load_state_dict(dense)
    stages.LOCKSTEP_BYTES, stages.DENSE_STORE_BYTES = WAYS.get(how, WAYS["lockstep"])
    t0 = time.perf_counter()
    if how == "sparsegpt":
        report = apply_sparsegpt(model, args.sparsity, args.structure, calibration=samples, progress=False)
    else:
        recipe, update = (args.recipe, args.update or None) if how in WAYS else (how, None)
        report = apply_metric(model, recipe, args.sparsity, args.structure, calibration=samples, update=update,
                              progress=False)
    seconds = time.perf_counter() - t0
    return seconds, report, {k: v.clone() for k, v in model.state_dict().items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="evolved-recipe-2of4")
    ap.add_argument("--update", default="", help="the recipe's update instead of its own (it must be staged)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--structure", default="2:4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--ways", default="lockstep,stored,passes")
    ap.add_argument("--compare", default="", help="catalog recipes timed beside it (comma-separated)")
    common_options(ap, "bench_staged", runs=False)
    args = ap.parse_args()
    out = Path(args.out)
    if not args.report_only:
        model, tok = load_model(None)
        dense = {k: v.clone() for k, v in model.state_dict().items()}
        samples, _, _ = calibration_for(tok, "wikipedia", args.nsamples, 512, args.seed, args.data_dir)
        ways = [w for w in args.ways.split(",") if w]
        order = ["sparsegpt", *ways, *[c for c in args.compare.split(",") if c]]
        times = {how: [] for how in order}
        weights, updates = {}, {}
        for _ in range(args.repeats):
            for how in order:
                seconds, pruned, weights[how] = prune_once(model, dense, args, samples, how)
                times[how].append(seconds)
                updates[how] = pruned.update
                print(f"{how}: {seconds:.1f} s", flush=True)
        differ = {w: max(float((weights[w][k] - weights[ways[0]][k]).abs().max()) for k in dense) for w in ways[1:]}
        data = dict(settings=dict(recipe=args.recipe, update=args.update, sparsity=args.sparsity,
                                  structure=args.structure,
                                  nsamples=args.nsamples, seqlen=512, seed=args.seed, repeats=args.repeats,
                                  threads=torch.get_num_threads(), processor=platform.processor(),
                                  cpu=_cpu(), torch=torch.__version__),
                    updates=updates, times=times, ways=ways, max_weight_difference=differ)
        out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    data = json.loads(out.with_suffix(".json").read_text())
    report(data, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def report(data, path):
    s, t, ways = data["settings"], data["times"], data["ways"]
    recipe = s["recipe"] if not s.get("update") else f"{s['recipe']}` + `{s['update']}"
    best = {how: min(v) for how, v in t.items()}
    shape = s["structure"] if s["structure"] != "unstructured" else f"{s['sparsity']:.0%} unstructured"
    lines = [f"# A staged recipe's walks beside SparseGPT ({shape})", "",
             f"Calibration {s['nsamples']} x {s['seqlen']} Wikipedia tokens (seed {s['seed']}), "
             f"{s['threads']} threads, "
             f"{s['cpu']}, torch {s['torch']}; every row pruned from the dense model in one process, "
             f"{s['repeats']} time(s) each in turn, the fastest shown.", "",
             "| pruned by | walk | update | prune s | x SparseGPT |", "|---|---|---|---:|---:|"]
    for how in t:
        name = recipe if how in ways else how
        walk = how if how in ways else "its own"
        upd = data["updates"][how]
        upd = " ".join(f"{k}={v}" for k, v in upd.items() if k != "kind") if how != "sparsegpt" else ""
        lines.append(f"| `{name}` | {walk} | {data['updates'][how].get('kind', '')} {upd} | {best[how]:.1f} | "
                     f"{best[how] / best['sparsegpt']:.2f} |")
    lines += ["", "Largest difference from the lockstep walk's pruned weights: " +
              ", ".join(f"{w} {d:.2e}" for w, d in data["max_weight_difference"].items()) + "."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
