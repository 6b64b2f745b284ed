"""The mask selection inside ADMM's iterations, before and after the no-surplus-ties shortcut of
`masks.lowest_k`: one ADMM reconstruction (20 iterations, the mask re-chosen in 15) of each of
the bundled model's layer shapes, with H from correlated random inputs, the two selections
alternated in one process; the masks and weights must come out identical.

    python experiments/bench_selection.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import prunerzero.engine.masks as masks
from prunerzero.engine.reconstruct import Update, admm_factor, admm_weights

SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576), "gate_proj/up_proj": (1536, 576),
          "down_proj": (576, 1536)}


def lowest_k_with_count(scores, k):
    """The selection as it was: the tie-breaking count over every row, always."""
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = scores.kthvalue(k, dim=-1, keepdim=True).values
    below, tie = scores < kth, scores == kth
    need = k - below.sum(-1, keepdim=True)
    return below | (tie & (tie.cumsum(-1) <= need))


def layer(out, inp, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4096, inp, generator=g) @ (torch.eye(inp) + 0.1 * torch.randn(inp, inp, generator=g))
    return torch.randn(out, inp, generator=g) * 0.05, X.T @ X


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_selection"))
    a = ap.parse_args()
    new = masks.lowest_k
    rows = []
    for name, (out, inp) in SHAPES.items():
        W, H = layer(out, inp)
        xn = H.diagonal().sqrt()
        up = Update("admm")
        f = admm_factor(H, up)
        for structure in ("unstructured", "2:4"):
            times = {"count always": [], "shortcut": []}
            results = {}
            for _ in range(a.repeats):
                for label, fn in (("count always", lowest_k_with_count), ("shortcut", new)):
                    masks.lowest_k = fn
                    t0 = time.perf_counter()
                    results[label] = admm_weights(W, f, lambda w: w.abs() * xn, 0.5, structure, "row", up)
                    times[label].append(time.perf_counter() - t0)
            masks.lowest_k = new
            assert torch.equal(results["count always"], results["shortcut"]), (name, structure)
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            rows.append(dict(layer=name, shape=[out, inp], structure=structure, before_s=med["count always"],
                             after_s=med["shortcut"], speedup=med["count always"] / med["shortcut"]))
            print(rows[-1], flush=True)
    data = dict(settings=dict(repeats=a.repeats, threads=torch.get_num_threads(), torch=torch.__version__,
                              machine=platform.machine(), processor=platform.processor()), rows=rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).with_suffix(".json").write_text(json.dumps(data, indent=2))
    lines = [f"# ADMM mask selection, before and after the shortcut ({data['settings']['threads']} threads, "
             f"torch {torch.__version__}; median of {a.repeats}, alternated; identical weights)", "",
             "| layer | shape | structure | before s | after s | speed-up |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['structure']} | {r['before_s']:.3f} | "
              f"{r['after_s']:.3f} | {r['speedup']:.2f}x |" for r in rows]
    Path(a.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
