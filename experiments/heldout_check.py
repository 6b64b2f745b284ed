"""A metric found on the search chunks, checked on text the search never saw: each metric is
applied sequentially with an update, as `prunerzero apply` does, to a fresh copy of the default
model (calibration --nsamples x 512 Wikipedia tokens, --seed), then measured on WikiText-2
512x64 (the first 64 chunks of the test split; a search scores the last ones) and on held-out
Wikipedia (chunks disjoint from the calibration windows), with its prune time. Metrics are
alternated in one process, so the times compare.

    python experiments/heldout_check.py "sqr(W)*X" wanda --update admm [--structure 2:4] [--seed 0]
    python experiments/heldout_check.py sparsegpt "sqr(W)*X@admm correct=0.2 staged=1" "wanda@admm"

A metric may carry its own update after "@" (else --update's, else a catalogued recipe's, else
admm); `sparsegpt` is SparseGPT itself.

Appends one row per metric, with the settings, to results/heldout_check.jsonl and rewrites
results/heldout_check.md from every row.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from common import RESULTS
from prunerzero import apply_metric, apply_sparsegpt, perplexity
from prunerzero.engine.reconstruct import UPDATES, Update
from prunerzero.language.space import load_space
from prunerzero.data import NO_BOS
from prunerzero.loading import load_model
from prunerzero.pipeline import WIKIPEDIA_HELDOUT, calibration_for, eval_data_for


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics", nargs="*")
    ap.add_argument("--update", default=None)
    ap.add_argument("--sparsity", type=float, default=None)
    ap.add_argument("--structure", default="unstructured")
    ap.add_argument("--allocation", default=None,
                    help="per-layer sparsity for every metric (not sparsegpt): owl, search or a saved FILE.json")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--chunks", type=int, default=64, help="WikiText-2 chunks (and held-out Wikipedia chunks)")
    ap.add_argument("--wiki-chunks", type=int, default=32, help="held-out Wikipedia chunks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(RESULTS / "heldout_check"))
    ap.add_argument("--report-only", action="store_true", help="Rewrite the markdown from the jsonl.")
    a = ap.parse_args()
    path = a.out + ".jsonl"
    if a.report_only:
        return write_report(path)
    if not a.metrics:
        ap.error("give the metrics to check (or --report-only)")
    model, tok = load_model(None)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    samples, ids, starts = calibration_for(tok, "wikipedia", a.nsamples, 512, a.seed, a.data_dir)
    wt2 = eval_data_for(tok, None, 512, a.chunks, a.data_dir).chunks
    wiki = eval_data_for(tok, WIKIPEDIA_HELDOUT, 512, a.wiki_chunks, a.data_dir, "wikipedia", ids, starts,
                         NO_BOS).chunks
    settings = dict(update=a.update, allocation=a.allocation, sparsity=a.sparsity, structure=a.structure, nsamples=a.nsamples, seqlen=512,
                    seed=a.seed, wt2_chunks=len(wt2), wiki_chunks=len(wiki), threads=torch.get_num_threads(),
                    processor=platform.processor(), machine=platform.machine(), torch=torch.__version__)
    sparsity = a.sparsity if a.sparsity is not None else 0.5
    for given in a.metrics:
        metric, _, update = given.partition("@")
        model.load_state_dict(dense)
        t0 = time.perf_counter()
        if metric == "sparsegpt":
            report = apply_sparsegpt(model, sparsity, a.structure, calibration=samples, progress=False)
        else:
            report = apply_metric(model, metric, sparsity, a.structure, calibration=samples,
                                  update=update or a.update or recipe_update(metric), allocation=a.allocation,
                                  progress=False)
        row = dict(metric=metric, canonical=report.canonical, update=report.update, settings=settings,
                   prune_s=time.perf_counter() - t0, wt2=perplexity(model, wt2, progress=False),
                   wikipedia=perplexity(model, wiki, progress=False))
        print(row, flush=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    write_report(path)


def write_report(path) -> None:
    """Rewrite the markdown table beside `path` (the jsonl) from every row in it."""
    rows = [json.loads(line) for line in open(path)]
    lines = ["# Searched metrics on held-out text (sequential, as apply prunes)", "",
             "| metric | update | pattern | allocation | calibration seed | WT2 512x64 | held-out Wikipedia | prune s |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| `{r['metric']}` | {spec(r['update'])} | {_shape(r['settings'])} | "
              f"{r['settings'].get('allocation') or 'uniform'} | {r['settings']['seed']} | "
              f"{r['wt2']:.3f} | {r['wikipedia']:.3f} | {r['prune_s']:.0f} |" for r in rows]
    with open(str(path).replace(".jsonl", ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _shape(settings: dict) -> str:
    """The structure, with the sparsity when unstructured (0.5 unless given)."""
    if settings["structure"] != "unstructured":
        return settings["structure"]
    return f"{settings.get('sparsity') or 0.5:.0%}"


def recipe_update(metric: str) -> str:
    entry = load_space().catalog.get(metric)
    return entry.update if entry is not None and entry.update != "none" else "admm"


def spec(update: dict) -> str:
    """A row's update as --update spells it (SparseGPT's own sweep: its name)."""
    if update.get("kind") not in UPDATES:
        return update.get("kind", "")
    return Update(**{k: v for k, v in update.items() if k in Update.__dataclass_fields__}).spec()


if __name__ == "__main__":
    main()
