"""The mask selection inside ADMM's iterations, as it was (torch's kthvalue, a sort per N:M
group, five passes to check the scores), then (numpy's introselect with each row's scores up to
the k-th counted, N:M by elementwise ranks, one min/max pass, N:M on the way selected among all
scores with the unpruned ones at +inf) and as it is (the surplus ties read off the partition's
right part instead of counted; N:M groups sorted by a min/max network, and the fraction on the
way selected among the pattern's pruned scores only): one ADMM reconstruction (20 iterations,
the mask re-chosen in 15) of each of the bundled model's layer shapes, with H from correlated
random inputs and Wanda's metric, the three alternated in one process; masks and weights must
come out identical.

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
import prunerzero.engine.reconstruct as reconstruct
import prunerzero.language.compile as compile_
from prunerzero.engine.reconstruct import Update, admm_factor, admm_weights

SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576), "gate_proj/up_proj": (1536, 576),
          "down_proj": (576, 1536)}
STRUCTURES = ("unstructured", "2:4", "4:8")


SELECT = masks._select


def surplus_counted(scores, kth, k):
    """The rows with surplus ties at their k-th score (None: none), counted as the selections
    before did: each row's scores up to the k-th, summed."""
    tied = (scores <= kth).sum(-1) != k
    return tied if bool(tied.any()) else None


def kth_by_torch(scores, k):
    kth = scores.kthvalue(k, dim=-1, keepdim=True).values
    return kth, surplus_counted(scores, kth, k)


def counted(scores, k):
    """The introselect's k-th score, the surplus ties counted."""
    kth = SELECT(scores, k)[0]
    return kth, surplus_counted(scores, kth, k)


def nm_by_rank(scores, n, m):
    rows, cols = scores.shape
    if bool(scores.isnan().any()):
        return nm_by_sort(scores, n, m)
    return masks._nm_by_rank(scores.reshape(rows, cols // m, m), n, m).reshape(rows, cols)


def padded(scores, n, m, fraction):
    """The N:M fraction on the way as it was: among all scores, the unpruned ones at +inf."""
    full = masks.nm_mask(scores, n, m)
    among = torch.where(full, scores, torch.inf).reshape(1, -1)
    return masks.lowest_k(among, int(full.sum() * fraction)).reshape(full.shape)


def nm_by_sort(scores, n, m):
    rows, cols = scores.shape
    order = torch.sort(scores.reshape(rows, cols // m, m), dim=-1, stable=True).indices[..., :n]
    return torch.zeros(rows, cols // m, m, dtype=torch.bool).scatter_(-1, order, True).reshape(rows, cols)


def check_in_five_passes(scores, where=""):
    if not bool(torch.isfinite(scores).all()):
        raise compile_.NonFiniteScoreError("non-finite")
    if scores.numel() > 1 and bool(scores.amin() == scores.amax()):
        raise compile_.DegenerateMetricError("degenerate")
    if scores.shape[-1] > 1 and bool((scores.amin(-1) == scores.amax(-1)).all()):
        raise compile_.DegenerateMetricError("degenerate rows")


WAYS = {"before": dict(select=kth_by_torch, nm=nm_by_sort, check=check_in_five_passes, fraction=padded),
        "counted": dict(select=counted, nm=nm_by_rank, check=compile_.check_scores, fraction=padded),
        "after": dict(select=SELECT, nm=masks.nm_mask, check=compile_.check_scores, fraction=masks.nm_fraction)}


def use(way):
    masks._select, masks.nm_mask, compile_.check_scores = way["select"], way["nm"], way["check"]
    reconstruct.nm_fraction = way["fraction"]


def layer(out, inp, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4096, inp, generator=g) @ (torch.eye(inp) + 0.1 * torch.randn(inp, inp, generator=g))
    return torch.randn(out, inp, generator=g) * 0.05, X.T @ X


def time_shape(W, H, structure, repeats):
    xn = H.diagonal().sqrt()

    def score(w):
        s = w.abs() * xn
        compile_.check_scores(s)
        return s
    up = Update("admm")
    f = admm_factor(H, up)
    sparsity = 0.5
    times, results = {k: [] for k in WAYS}, {}
    for _ in range(repeats):
        for label, selection in WAYS.items():
            use(selection)
            t0 = time.perf_counter()
            results[label] = admm_weights(W, f, score, sparsity, structure, "row", up)
            times[label].append(time.perf_counter() - t0)
    use(WAYS["after"])
    assert all(torch.equal(results["before"], r) for r in results.values()), structure
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_selection"))
    a = ap.parse_args()
    rows = []
    for name, (out, inp) in SHAPES.items():
        W, H = layer(out, inp)
        for structure in STRUCTURES:
            med = time_shape(W, H, structure, a.repeats)
            rows.append(dict(layer=name, shape=[out, inp], structure=structure, before_s=med["before"],
                             counted_s=med["counted"], after_s=med["after"], speedup=med["before"] / med["after"],
                             over_counted=med["counted"] / med["after"]))
            print(rows[-1], flush=True)
    data = dict(settings=dict(repeats=a.repeats, threads=torch.get_num_threads(), torch=torch.__version__,
                              machine=platform.machine(), processor=platform.processor()), rows=rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).with_suffix(".json").write_text(json.dumps(data, indent=2))
    lines = [f"# One ADMM reconstruction (20 iterations, 15 selections), three ways of selecting "
             f"({data['settings']['threads']} threads, torch {torch.__version__}; median of {a.repeats}, alternated; "
             "identical weights)", "",
             "Before: torch's kthvalue, a stable sort per N:M group, five passes to check the scores. Counted: "
             "numpy's introselect with each row's scores up to the k-th counted for surplus ties, N:M by "
             "elementwise ranks, one min/max pass, the N:M fraction on the way selected with the unpruned "
             "scores at +inf. After: the surplus read off the partition's right part, N:M groups sorted by a "
             "min/max network, the fraction selected among the pattern's pruned scores. "
             "The time is the whole reconstruction, its 20 matrix products included.", "",
             "| layer | shape | structure | before s | counted s | after s | after vs before | after vs counted |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['structure']} | {r['before_s']:.3f} | "
              f"{r['counted_s']:.3f} | {r['after_s']:.3f} | {r['speedup']:.2f}x | {r['over_counted']:.2f}x |"
              for r in rows]
    Path(a.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
