"""Staged, paired pruning (`staged=1` with `correct=c`) with the dense stream's layer inputs kept
from its one pass through each block and replayed for every stage, against a dense pass per
stage (what a block over blocks.DENSE_STORE_BYTES still does): the default model pruned with
one recipe from --nsamples x 512 Wikipedia tokens, the two ways alternated in one process
(--repeats each), the pruned weights compared and the prune times put side by side.

    python experiments/bench_dense_store.py [--recipe evolved-recipe-70] [--sparsity 0.7] [--nsamples 16]

Writes results/bench_dense_store.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from common import common_options
from prunerzero import apply_metric
from prunerzero.engine import blocks
from prunerzero.loading import load_model
from prunerzero.pipeline import calibration_for

WAYS = {"stored": blocks.DENSE_STORE_BYTES, "a pass per stage": 0}


def prune_once(model, dense, args, samples, budget):
    model.load_state_dict(dense)
    blocks.DENSE_STORE_BYTES = budget
    t0 = time.perf_counter()
    report = apply_metric(model, args.recipe, args.sparsity, args.structure, calibration=samples, progress=False)
    seconds = time.perf_counter() - t0
    return seconds, report, {k: v.clone() for k, v in model.state_dict().items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="evolved-recipe-70")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--structure", default="unstructured")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    common_options(ap, "bench_dense_store", runs=False)
    args = ap.parse_args()
    out = Path(args.out)
    if not args.report_only:
        model, tok = load_model(None)
        dense = {k: v.clone() for k, v in model.state_dict().items()}
        samples, _, _ = calibration_for(tok, "wikipedia", args.nsamples, 512, args.seed, args.data_dir)
        times = {way: [] for way in WAYS}
        weights, update = {}, None
        for _ in range(args.repeats):
            for way, budget in WAYS.items():
                seconds, pruned, weights[way] = prune_once(model, dense, args, samples, budget)
                times[way].append(seconds)
                update = pruned.update
                print(f"{way}: {seconds:.1f} s", flush=True)
        differ = max(float((weights["stored"][k] - weights["a pass per stage"][k]).abs().max()) for k in dense)
        data = dict(settings=dict(recipe=args.recipe, update=update, sparsity=args.sparsity, structure=args.structure,
                                  nsamples=args.nsamples, seqlen=512, seed=args.seed, repeats=args.repeats,
                                  threads=torch.get_num_threads(), processor=platform.processor(),
                                  cpu=_cpu(), torch=torch.__version__),
                    times=times, max_weight_difference=differ)
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
    s, t = data["settings"], data["times"]
    best = {way: min(v) for way, v in t.items()}
    lines = [f"# Staged, paired pruning: the dense stream's inputs stored, or a dense pass per stage", "",
             f"`{s['recipe']}` ({s['update']}), {s['structure']} {s['sparsity']}, calibration {s['nsamples']} x "
             f"{s['seqlen']} Wikipedia tokens (seed {s['seed']}), {s['threads']} threads, {s['cpu']}, torch "
             f"{s['torch']}; the two ways alternated in one process, {s['repeats']} prune(s) each, the fastest shown.",
             "", "| way | prune s | x stored |", "|---|---:|---:|"]
    lines += [f"| {way} | {best[way]:.1f} | {best[way] / best['stored']:.2f} |" for way in t]
    lines += ["", f"Largest difference between the two ways' pruned weights: {data['max_weight_difference']:.2e}."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
