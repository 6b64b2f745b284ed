"""How far float rounding alone moves SparseGPT, to judge the gaps to the published code.

SparseGPT is run again with the layer Hessians summed the way the published code sums them
(a running mean, one calibration sample at a time, scaled by 2/n), which is the same matrix
up to a scale that the method ignores. Along the way every N:M choice is also made with the
published code's rule (torch.topk) and the groups where it disagrees with ours (a stable
sort) are counted. The one-sum figures are bench_pruning's SparseGPT rows (same settings).

    PRUNERZERO_DATA_DIR=../shared/data python experiments/probe_sparsegpt_rounding.py
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch

import prunerzero.engine.prune
import prunerzero.engine.sparsegpt
from prunerzero import apply_sparsegpt, perplexity
from prunerzero.engine.calibration import Hessians

from bench_pruning import PUBLISHED, Bench
from common import RESULTS, common_options

STRUCTURES = ["unstructured", "2:4", "4:8"]


def running_mean_hessians(seqlen: int):
    """A Hessians recorder that accumulates as the published code does."""
    class RunningMean(Hessians):
        def __init__(self, linears):
            self.count = {}
            super().__init__(linears)

        def add(self, name, x):
            n = self.count.get(name, 0)
            H = self.H.setdefault(name, torch.zeros(x.shape[1], x.shape[1], device=x.device))
            for s in x.float().split(seqlen):  # one calibration sample at a time
                H.mul_(n / (n + 1))
                n += 1
                s = math.sqrt(2 / n) * s
                H.addmm_(s.T, s)
            self.count[name] = n
    return RunningMean


def topk_nm(scores, n, m):
    groups = scores.reshape(scores.shape[0], -1, m)
    idx = torch.topk(groups, n, dim=-1, largest=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)


@contextlib.contextmanager
def published_accumulation(seqlen: int, flips: list):
    """Swap in the running-mean Hessians and count N:M tie-break disagreements, then restore."""
    saved = prunerzero.engine.prune.Hessians, prunerzero.engine.sparsegpt.nm_mask
    ours = saved[1]

    def counting(scores, n, m):
        mask = ours(scores, n, m)
        flips[0] += int((mask.reshape(scores.shape[0], -1, m) != topk_nm(scores, n, m)).any(-1).sum())
        return mask

    prunerzero.engine.prune.Hessians, prunerzero.engine.sparsegpt.nm_mask = running_mean_hessians(seqlen), counting
    try:
        yield
    finally:
        prunerzero.engine.prune.Hessians, prunerzero.engine.sparsegpt.nm_mask = saved


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=64)
    common_options(ap, "probe_sparsegpt_rounding", runs=False)
    args = ap.parse_args()
    out = Path(args.out)
    if not args.report_only:
        measure(args, out)
    report(json.loads(out.with_suffix(".json").read_text()), out)


def measure(args, out):
    path = out.with_suffix(".json")
    data = json.loads(path.read_text()) if path.is_file() else {"settings": vars(args), "results": {}}
    # bench_pruning's Bench holds the same model, calibration draws and evaluation chunks,
    # and its SparseGPT rows are the one-sum figures (measured there if still missing)
    bench = Bench(argparse.Namespace(model=None, nsamples=args.nsamples, seqlen=args.seqlen, chunks=args.chunks,
                                     seed=args.seed, data_dir=args.data_dir, out=str(RESULTS / "bench_pruning")))
    samples, ev = bench.calibration(args.nsamples)[0], bench.chunks(full=False)
    for structure in STRUCTURES:
        if structure in data["results"]:
            continue
        one_sum = bench.run("sparsegpt", structure, 0.5)["perplexity"]
        bench.restore()
        flips, t0 = [0], time.perf_counter()
        with published_accumulation(args.seqlen, flips):
            apply_sparsegpt(bench.model, 0.5, structure, calibration=samples)
        ppl = perplexity(bench.model, ev.chunks)
        data["results"][structure] = dict(running_mean=ppl, one_sum=one_sum, published=PUBLISHED[("sparsegpt", structure)],
                                          topk_disagreements=flips[0] if structure != "unstructured" else None,
                                          seconds=time.perf_counter() - t0)
        print(structure, data["results"][structure], flush=True)
        path.write_text(json.dumps(data, indent=2))


def report(data, out):
    s = data["settings"]
    lines = ["# SparseGPT under float rounding", "",
             f"SmolLM2-135M, calibration {s['nsamples']} x {s['seqlen']} wikipedia tokens, seed {s['seed']}, "
             f"WT2 first {s['chunks']} chunks of {s['seqlen']}. 'one sum': this library (bench_pruning); "
             "'running mean': the same with the Hessian summed as the published code sums it; "
             "'topk disagreements': N:M groups where torch.topk would pick differently from our stable sort.", "",
             "| pattern | one sum | running mean | change | published code | topk disagreements |",
             "|---|---:|---:|---:|---:|---:|"]
    for structure, r in data["results"].items():
        change = 100 * (r["running_mean"] / r["one_sum"] - 1)
        flips = "" if r["topk_disagreements"] is None else r["topk_disagreements"]
        lines.append(f"| {structure} | {r['one_sum']:.3f} | {r['running_mean']:.3f} | {change:+.1f}% | "
                     f"{r['published']:.3f} | {flips} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
