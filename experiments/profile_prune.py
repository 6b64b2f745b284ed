"""Where a prune's time goes: one sequential prune of the default model under cProfile, its time
split over the parts every recipe shares (block passes: the layers' products, attention, the
recorded statistics) and the parts a reconstruction adds (factorisations, the dense fit of
`correct=`, ADMM's iterations and its mask selections).

    python experiments/profile_prune.py "sqr(W)*X" --update "admm correct=0.2" [--structure 2:4]
    python experiments/profile_prune.py sparsegpt

Appends one row (the settings, the split, the 25 costliest functions) to
results/profile_prune.jsonl and rewrites results/profile_prune.md from every row.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import time

import torch

from common import RESULTS
from prunerzero import apply_metric, apply_sparsegpt
from prunerzero.loading import load_model
from prunerzero.pipeline import calibration_for

# (part, file fragment, function name): cumulative time of the function, as pstats names it
PARTS = [
    ("block passes (forward)", "blocks.py", "run_block"),
    ("stage passes (forward)", "blocks.py", "feed"),
    ("paired passes (forward)", "blocks.py", "run_paired"),
    ("recording X^T X (and X^T Xd)", "calibration.py", "add"),
    ("factorisations", "reconstruct.py", "factorise"),
    ("dense fit (correct=)", "reconstruct.py", "fit"),
    ("ADMM iterations", "reconstruct.py", "admm_weights"),
    ("mask selections", "masks.py", "make_mask"),
    ("OBS sweeps", "reconstruct.py", "obs_sweep"),
    ("SparseGPT", "sparsegpt.py", "prune_with_sparsegpt"),
]


def split(stats: pstats.Stats) -> dict:
    out = {}
    for part, where, name in PARTS:
        # the largest match: a subclass's method that calls its parent's (PairedHessians.add) holds both
        total = max((v[3] for (path, _, fn), v in stats.stats.items() if fn == name and path.endswith(where)),
                    default=0)
        if total:
            out[part] = total
    return out


def top(stats: pstats.Stats, n: int = 25) -> list:
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:n]
    return [dict(function=f"{path.rsplit('/', 1)[-1]}:{line}({fn})", calls=v[1], self_s=v[2], cumulative_s=v[3])
            for (path, line, fn), v in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metric", help="a metric or catalog name, or sparsegpt")
    ap.add_argument("--update", default=None)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--structure", default="unstructured")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    model, tok = load_model(None)
    samples, _, _ = calibration_for(tok, "wikipedia", 32, 512, a.seed, None)
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    if a.metric == "sparsegpt":
        report = apply_sparsegpt(model, a.sparsity, a.structure, calibration=samples, progress=False)
    else:
        report = apply_metric(model, a.metric, a.sparsity, a.structure, calibration=samples, update=a.update,
                              progress=False)
    profiler.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(profiler)
    row = dict(metric=a.metric, update=report.update, structure=a.structure, sparsity=a.sparsity, seed=a.seed,
               wall_s=wall, parts=split(stats), top=top(stats), threads=torch.get_num_threads(),
               processor=platform.processor(), machine=platform.machine(), torch=torch.__version__)
    path = RESULTS / "profile_prune.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    write_md([json.loads(line) for line in open(path)])
    print(json.dumps({k: row[k] for k in ("metric", "update", "wall_s", "parts")}, indent=1))


def write_md(rows):
    lines = ["# Where a prune's time goes (cProfile, cumulative seconds; parts overlap where one calls another)", ""]
    for r in rows:
        update = " ".join(f"{k}={v}" for k, v in r["update"].items())
        lines += [f"## `{r['metric']}`, {update}, {r['structure']} ({r['sparsity']}), seed {r['seed']}: "
                  f"{r['wall_s']:.0f} s ({r['threads']} threads, {r['machine']})", "",
                  "| part | seconds |", "|---|---:|"]
        lines += [f"| {part} | {s:.1f} |" for part, s in r["parts"].items()]
        lines += ["", "| function | calls | self s | cumulative s |", "|---|---:|---:|---:|"]
        lines += [f"| `{t['function']}` | {t['calls']} | {t['self_s']:.1f} | {t['cumulative_s']:.1f} |"
                  for t in r["top"][:12]]
        lines.append("")
    (RESULTS / "profile_prune.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
