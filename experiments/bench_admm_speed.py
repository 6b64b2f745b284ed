"""ADMM reconstruction against SparseGPT: prune time and perplexity, side by side in one process.

    python experiments/bench_admm_speed.py [--structures unstructured,2:4] [--iters 20/15,12/9,20/15/10]

For each structure: SparseGPT, then Wanda's mask + ADMM at each --iters setting
(iterations/gradual-mask iterations, and a third number for admm-pcg: conjugate-gradient steps
on the final mask), each applied sequentially to a fresh copy of the
default model with 32 x 512 Wikipedia calibration tokens (seed 0), timed (the pruning call
only) and evaluated on --chunks WikiText-2 chunks of 512. Alternating methods within one run
keeps the time ratios fair on a noisy machine. Writes results/bench_admm_speed.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from common import common_options
from prunerzero import apply_metric, apply_sparsegpt, perplexity
from prunerzero.loading import load_model
from prunerzero.pipeline import calibration_for, eval_data_for
from prunerzero.engine.reconstruct import Update


def run(model, dense, method, structure, samples, chunks):
    model.load_state_dict(dense)
    t0 = time.perf_counter()
    if method == "sparsegpt":
        apply_sparsegpt(model, 0.5, structure, calibration=samples, progress=False)
    else:
        kind, numbers = method.split(" ")
        iters, gradual, *refine = map(int, numbers.split("/"))
        update = Update(kind, iters=iters, gradual=gradual, refine=refine[0] if refine else None)
        apply_metric(model, "wanda", 0.5, structure, calibration=samples, progress=False, update=update)
    prune_s = time.perf_counter() - t0
    return dict(method=method, structure=structure, prune_s=prune_s,
                perplexity=perplexity(model, chunks, progress=False))


def report(data, out: Path):
    s = data["settings"]
    lines = [f"# ADMM reconstruction against SparseGPT ({s['threads']} threads, {s['machine']}, torch {s['torch']})", "",
             f"Sequential, calibration {s['nsamples']} x {s['seqlen']} Wikipedia tokens, seed {s['seed']}; "
             f"perplexity on WikiText-2 {s['chunks']} x {s['seqlen']}; time = the pruning call, methods alternated "
             "in one process. 'admm I/G': Wanda's mask + ADMM, I iterations, the mask re-chosen over the first G; "
             "'admm-pcg I/G/R': then R conjugate-gradient steps on the final mask.", "",
             "| structure | method | perplexity | prune s | time / SparseGPT |", "|---|---|---:|---:|---:|"]
    for structure in dict.fromkeys(r["structure"] for r in data["rows"]):
        rows = [r for r in data["rows"] if r["structure"] == structure]
        ref = next((r["prune_s"] for r in rows if r["method"] == "sparsegpt"), None)
        for r in rows:
            ratio = f"{r['prune_s'] / ref:.2f}" if ref else ""
            lines.append(f"| {structure} | {r['method']} | {r['perplexity']:.3f} | {r['prune_s']:.1f} | {ratio} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--structures", default="unstructured,2:4")
    ap.add_argument("--iters", default="20/15,12/9")
    ap.add_argument("--chunks", type=int, default=64)
    common_options(ap, "bench_admm_speed", runs=False)
    args = ap.parse_args()
    out = Path(args.out)
    if args.report_only:
        return report(json.loads(out.with_suffix(".json").read_text()), out)
    model, tok = load_model(None)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    samples = calibration_for(tok, nsamples=32, seqlen=512, seed=args.seed, data_dir=args.data_dir)[0]
    chunks = eval_data_for(tok, seqlen=512, chunks=args.chunks, data_dir=args.data_dir).chunks
    data = dict(settings=dict(nsamples=32, seqlen=512, seed=args.seed, chunks=args.chunks, threads=torch.get_num_threads(),
                              torch=torch.__version__, machine=platform.machine()), rows=[])
    methods = ["sparsegpt"] + [f"{'admm-pcg' if it.count('/') == 2 else 'admm'} {it}" for it in args.iters.split(",")]
    for structure in args.structures.split(","):
        for method in methods:
            data["rows"].append(run(model, dense, method, structure, samples, chunks))
            print(data["rows"][-1], flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    report(data, out)


if __name__ == "__main__":
    main()
