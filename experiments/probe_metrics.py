"""Search fitness of hand-written metrics: what a search would give them, before a search.

    python experiments/probe_metrics.py "abs(W)*X" "abs(W)*(X + 100*G)" ... [--structure 2:4] [--chunks 16]

Each metric prunes the default model one-shot from the cached dense primitives (exactly as
`prunerzero evolve` scores a candidate) and is measured on the search chunks (the last
--chunks chunks of the WikiText-2 test split, never the held-out ones). Use it to check
that a search space contains metrics better than the baselines. Appends one JSON line per
metric, with the settings, to results/probe_metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import time

from common import RESULTS
from prunerzero.language.metric import Metric
from prunerzero.search.config import SearchConfig
from prunerzero.search.evaluator import Task
from prunerzero.search.run import COMPUTE, search_evaluator


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", nargs="+")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--structure", default="unstructured")
    ap.add_argument("--chunks", type=int, default=16, help="search chunks (the last ones of the test split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(RESULTS / "probe_metrics.jsonl"))
    args = ap.parse_args()
    cfg = SearchConfig(sparsity=args.sparsity, structure=args.structure, stages=(args.chunks,), heldout_chunks=0,
                       seed=args.seed, data_dir=args.data_dir)
    metrics = [Metric.parse(m) for m in args.metrics]
    ev, data = search_evaluator(cfg, set().union(*(m.terminals for m in metrics)) & set(COMPUTE))
    if data.note:
        print("NOTE: " + data.note)
    with open(args.out, "a") as f:
        for text, m in zip(args.metrics, metrics):
            t0 = time.perf_counter()
            r = ev(Task(text, 0, args.chunks))
            print(f"{r.perplexity:10.3f}  {text}" + (f"  ({r.error})" if r.error else ""), flush=True)
            ppl = r.perplexity if math.isfinite(r.perplexity) else None
            f.write(json.dumps(dict(metric=text, simplified=m.simplify().text, search_perplexity=ppl, error=r.error,
                                    sparsity=args.sparsity, structure=args.structure, chunks=args.chunks,
                                    seed=args.seed, source=data.source, seconds=round(time.perf_counter() - t0, 1)))
                    + "\n")


if __name__ == "__main__":
    main()
