"""Metric search on the default model: evolution against random search at the same time budget.

    python experiments/bench_evolve.py [--structures unstructured,2:4] [--budget 3600] [--threads 1] [--check 8]

For each structure (sparsity 0.5), the two strategies (--strategies) run side by side, one process and
--threads torch threads each, for --budget seconds of search (the generation in progress is
finished), then re-evaluate their hall of fame on the held-out chunks (the first 64 chunks of
the WikiText-2 test split, the protocol of bench_pruning; the search chunks are the last 16).
Runs live in --runs (git-ignored); a rerun resumes unfinished runs and reuses finished ones.

Afterwards, for each evolution run, a staging check: the --check best candidates that staging
stopped after the first stage are evaluated on all search chunks, to see whether full
evaluation would have found a better metric, and the rank correlation between first-stage and
full-search perplexity is reported.

Writes results/bench_evolve.{json,md} and results/bench_evolve.png.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from bench_pruning import row_key
from common import RESULTS, common_options, figure_row, save_figure
from prunerzero.search.config import SearchConfig
from prunerzero.search.evaluator import Task
from prunerzero.runs.rundir import RunDir
from prunerzero.search.run import run_evolve, search_evaluator

STRATEGIES = ("evolution", "random")
# Baselines re-evaluated on the held-out chunks by the evolution run (one-shot, like the search);
# the random run only needs Wanda, its reference for "time to beat Wanda".
BASELINES = {"evolution": ("magnitude", "wanda", "ria", "pruner-zero"), "random": ("wanda",)}


def config(args, structure: str, strategy: str) -> SearchConfig:
    return SearchConfig(sparsity=0.5, structure=structure, strategy=strategy, generations=100_000,
                        time_limit=args.budget, threads=args.threads, baselines=BASELINES[strategy],
                        hof_size=3, heldout_chunks=args.heldout_chunks, seed=args.seed, data_dir=args.data_dir)


def run_dir(args, structure, strategy) -> Path:
    return Path(args.runs) / f"{structure.replace(':', 'of')}-{strategy}"


def one_search(cfg: dict, path: str) -> dict:
    """A whole search in a child process: fresh, resumed, or already finished."""
    path = Path(path)
    if (path / "hall_of_fame.json").is_file():
        return json.loads((path / "hall_of_fame.json").read_text())
    torch.set_num_threads(cfg["threads"])
    log = lambda s: print(f"[{path.name}] {s}", flush=True)
    if (path / "checkpoint.json").is_file():
        return run_evolve(resume=path, log=log, quiet=True)
    return run_evolve(SearchConfig.from_dict(cfg), path, log=log, quiet=True)


def staged_runs(args, structure, strategies) -> dict:
    jobs = {s: (config(args, structure, s).to_dict(), str(run_dir(args, structure, s))) for s in strategies}
    with ProcessPoolExecutor(len(jobs), mp_context=get_context("spawn")) as pool:
        futures = {s: pool.submit(one_search, *job) for s, job in jobs.items()}
        return {s: f.result() for s, f in futures.items()}


def first_and_full(run: RunDir, k_first: int, k_full: int):
    """Per canonical key: perplexity after the first stage and on all search chunks."""
    first, full = {}, {}
    for r in run.read_lines("evaluations.jsonl"):
        if r.get("gen") == "baselines" or r["perplexity"] is None:
            continue
        hi = r["chunks"][1]
        (first if hi == k_first else full if hi == k_full else {})[r["key"]] = (r["metric"], r["perplexity"])
    return first, full


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def staging_check(args, structure) -> dict:
    """Evaluate on every search chunk the best candidates that staging stopped at stage 1."""
    path = run_dir(args, structure, "evolution")
    out_file = path / "staging_check.json"
    if out_file.is_file():
        return json.loads(out_file.read_text())
    run = RunDir(path, "evolve")
    cfg = SearchConfig.from_dict(run.config())
    k = cfg.stages[-1]
    first, full = first_and_full(run, cfg.stages[0], k)
    stopped = sorted((p, key, text) for key, (text, p) in first.items() if key not in full)[:args.check]
    cfg.threads = None  # the check runs alone: all threads
    ev, _ = search_evaluator(cfg)
    checked = []
    for p1, key, text in stopped:
        ppl = ev(Task(text, 0, k)).perplexity
        checked.append(dict(metric=text, first_stage=p1, all_chunks=ppl if math.isfinite(ppl) else None))
    pairs = [(first[key][1], full[key][1]) for key in full if key in first]
    best_staged = min(p for _, p in full.values())
    best_checked = min((c["all_chunks"] for c in checked if c["all_chunks"]), default=math.inf)
    out = dict(promoted_with_both=len(pairs), spearman_first_vs_all=spearman(*zip(*pairs)) if len(pairs) > 2 else None,
               best_staged=best_staged, best_of_stopped=best_checked, staging_kept_best=best_staged <= best_checked,
               checked=checked)
    out_file.write_text(json.dumps(out, indent=2))
    return out


def summary(args, structure, strategy, hof: dict) -> dict:
    log = RunDir(run_dir(args, structure, strategy)).read_lines("log.jsonl")
    last = log[-1]
    hours = last["elapsed_s"] / 3600
    hits = last["key_hits"] + last["mask_hits"]
    best = hof["hall_of_fame"][0] if hof["hall_of_fame"] else {}
    return dict(generations=len(log), search_s=last["elapsed_s"], candidates=last["candidates"],
                candidates_per_h=last["candidates"] / hours, distinct_masks=last["distinct_masks"],
                distinct_masks_per_h=last["distinct_masks"] / hours, evaluations=last["evaluations"],
                cache_hit_rate=hits / max(1, hits + last["evaluations"]),
                staging_saved=1 - last["chunk_evals"] / max(1, last["chunks_without_staging"]),
                oos_catches=last["oos_catches"], failures=last["failures"], invalid=last["invalid"],
                first_beat_wanda_s=last["first_beat_wanda_s"],
                best_metric=best.get("simplified"), best_search=best.get("search_perplexity"),
                best_heldout=best.get("heldout_perplexity"),
                curve=[(r["elapsed_s"], r["best"]) for r in log],
                hall_of_fame=hof["hall_of_fame"], baselines=hof["baselines"], dense=hof["dense"])


def sparsegpt_heldout(structure, chunks: int) -> float | None:
    """SparseGPT (sequential, with its weight update) on the same 64 held-out chunks, from bench_pruning."""
    f = RESULTS / "bench_pruning.json"
    if not f.is_file():
        return None
    r = json.loads(f.read_text())["results"].get(row_key("sparsegpt", structure, 0.5, 32, chunks))
    return r["perplexity"] if r else None


def plot(data, out: Path):
    structures = list(data["runs"])
    fig, axes = figure_row(len(structures))
    for ax, st in zip(axes, structures):
        runs = data["runs"][st]
        for i, s in enumerate(STRATEGIES):
            if s in runs:
                t, best = zip(*[(e / 60, b) for e, b in runs[s]["curve"] if b is not None])
                ax.step(t, best, where="post", marker=".", color=f"C{i}", label=f"{s}: best so far")
        wanda = runs["evolution"]["baselines"]["wanda"]["search_perplexity"]
        ax.axhline(wanda, ls="--", color="C3", label="wanda")
        ax.set(title=f"{st}, sparsity 0.5", xlabel="search time (min)", ylabel="best search perplexity (16 chunks)")
        lo, hi = ax.get_ylim()
        if hi > 3 * lo:  # a wide descent (2:4 starts near magnitude): log scale keeps the end readable
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, out)


def report(data, out: Path):
    s = data["settings"]
    lines = ["# Metric search on SmolLM2-135M (bundled)", "",
             f"Sparsity 0.5; calibration {s['nsamples']} x {s['seqlen']} tokens of wikipedia, seed {s['seed']}; "
             f"population {s['population']}, stages {s['stages']} (promote {s['promote']}); evolution and random "
             f"search side by side, {s['threads']} torch thread(s) each, {s['budget']:.0f} s of search each; "
             f"{s['cpu']}, torch {s['torch']}. Search fitness: the last 16 chunks of the WikiText-2 test split; "
             "held-out: its first 64 chunks (512 tokens each), one-shot masks from the dense primitives.", "",
             "| structure | strategy | generations | candidates/h | distinct masks/h | cache hit rate | "
             "evaluation saved by staging | time to beat Wanda by 0.1% (search) | best metric | search ppl | held-out ppl |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for st, runs in data["runs"].items():
        for name, r in runs.items():
            beat = "never" if r["first_beat_wanda_s"] is None else f"{r['first_beat_wanda_s'] / 60:.1f} min"
            lines.append(f"| {st} | {name} | {r['generations']} | {r['candidates_per_h']:.0f} | "
                         f"{r['distinct_masks_per_h']:.0f} | {r['cache_hit_rate']:.1%} | {r['staging_saved']:.1%} | "
                         f"{beat} | `{r['best_metric']}` | {_f(r['best_search'])} | {_f(r['best_heldout'])} |")
    alone = [st for st, runs in data["runs"].items() if set(runs) != set(STRATEGIES)]
    if alone:
        lines += ["", "Only " + "; ".join(f"{', '.join(data['runs'][st])} ran at {st}" for st in alone) + "."]
    lines += ["", "Held-out perplexity (first 64 chunks of WikiText-2 test, 512 tokens each):", "",
              "| structure | dense | magnitude (per row) | wanda | ria | pruner-zero | SparseGPT* | best evolved | best random |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for st, runs in data["runs"].items():
        ev, b = runs["evolution"], runs["evolution"]["baselines"]
        cells = [_f(ev["dense"]["heldout_perplexity"])] + [_f(b[m]["heldout_perplexity"]) if m in b else ""
                                                            for m in ("magnitude", "wanda", "ria", "pruner-zero")]
        cells += [_f(data["sparsegpt"].get(st)), _f(ev["best_heldout"]), _f(runs.get("random", {}).get("best_heldout"))]
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    lines += ["", "*SparseGPT updates the weights it keeps (sequential, from bench_pruning); every other column "
              "is a mask from a metric.", "", "Staging check (evolution runs):", ""]
    for st, c in data["staging"].items():
        lines.append(f"- {st}: rank correlation of 1-chunk and 16-chunk perplexity over {c['promoted_with_both']} "
                     f"fully evaluated candidates: {_f(c['spearman_first_vs_all'])}; best staged "
                     f"{_f(c['best_staged'])}; best of the {len(c['checked'])} best candidates stopped at stage 1, "
                     f"evaluated on all chunks: {_f(c['best_of_stopped'])} "
                     f"({'staging kept the best' if c['staging_kept_best'] else 'staging lost a better metric'}).")
    lines += ["", "Hall of fame (held-out perplexity):", ""]
    for st, runs in data["runs"].items():
        for name, r in runs.items():
            for e in r["hall_of_fame"]:
                lines.append(f"- {st}, {name}: `{e['simplified']}`: search {_f(e['search_perplexity'])}, "
                             f"held-out {_f(e['heldout_perplexity'])}")
    out.write_text("\n".join(lines) + "\n")


def _f(x):
    return "" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structures", default="unstructured,2:4")
    ap.add_argument("--budget", type=float, default=3600.0, help="seconds of search per run")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="which of evolution,random to run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per search process")
    ap.add_argument("--check", type=int, default=8, help="candidates stopped by staging to re-check in full")
    ap.add_argument("--heldout-chunks", type=int, default=64)
    common_options(ap, "bench_evolve")
    args = ap.parse_args()
    if args.report_only:
        data = json.loads(Path(args.out + ".json").read_text())
        report(data, Path(args.out + ".md"))
        return plot(data, Path(args.out + ".png"))
    structures, strategies = args.structures.split(","), args.strategies.split(",")
    cfg = config(args, structures[0], "evolution")
    # Results of structures and strategies not run this time are kept from the last run.
    old = Path(args.out + ".json")
    data = json.loads(old.read_text()) if old.is_file() else dict(runs={}, staging={}, sparsegpt={})
    data["settings"] = dict(budget=args.budget, threads=args.threads, seed=args.seed, nsamples=cfg.nsamples,
                            seqlen=cfg.seqlen, population=cfg.population, stages=list(cfg.stages),
                            promote=cfg.promote, torch=torch.__version__, cpu=platform.processor() or "cpu")
    for st in structures:
        hofs = staged_runs(args, st, strategies)
        data["runs"].setdefault(st, {}).update({s: summary(args, st, s, hofs[s]) for s in strategies})
        if "evolution" in strategies:
            data["staging"][st] = staging_check(args, st)
        data["sparsegpt"][st] = sparsegpt_heldout(st, args.heldout_chunks)
        Path(args.out + ".json").write_text(json.dumps(data, indent=2))
        report(data, Path(args.out + ".md"))
        plot(data, Path(args.out + ".png"))
    print(Path(args.out + ".md").read_text())


if __name__ == "__main__":
    main()
