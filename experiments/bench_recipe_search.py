"""Recipe search on the default model: `evolve --update admm` (metric mask + ADMM reconstruction).

    python experiments/bench_recipe_search.py [--structures unstructured,2:4] [--budget 2700] [--update admm]

For each structure (sparsity 0.5) one search runs under a time limit of --budget seconds for the
whole run (set-up, generations, final held-out scoring, as `evolve --time-limit`), seeded with Wanda: candidates are ranked first by the perplexity of their
masks alone on 2 search chunks (the cheap proxy), and the best quarter again with the kept
weights reconstructed by --update, on 8 chunks. The search text is held-out Wikipedia (chunks
disjoint from the calibration windows) and the reported text WikiText-2's test split (its first
64 chunks), so the carry-over ratio (held-out gain over Wanda+update / search gain) measures a
gain on text of another source. The search prunes one-shot (from the dense model's statistics);
the final rows apply the best recipe sequentially, as `prunerzero apply --update` does, beside
SparseGPT and Wanda+update from bench_pruning (same calibration, same chunks).

Proxy quality: the rank correlation (Spearman) of mask-only and reconstructed perplexity over the
candidates that were measured both ways (those promoted: a range-restricted sample).

Runs live in --runs (git-ignored); a rerun resumes unfinished runs and reuses finished ones, or
with --more S gives finished ones S more seconds (evolve --resume RUN --time-limit S), and
--generations N caps them at N generations.
Writes results/bench_recipe_search.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from bench_evolve import spearman
from bench_pruning import row_key
from common import RESULTS, common_options, curve_axes, figure_row, save_figure
from prunerzero import apply_metric, perplexity
from prunerzero.loading import load_model
from prunerzero.pipeline import calibration_for, eval_data_for
from prunerzero.search.config import SearchConfig
from prunerzero.runs.rundir import RunDir
from prunerzero.search.run import carry_over, run_evolve


def config(args, structure: str) -> SearchConfig:
    return SearchConfig(sparsity=0.5, structure=structure, update=args.update, search_data="wikipedia-heldout",
                        stages=(2, 8), proxy_stages=1, population=16, promote=0.25, generations=100_000,
                        time_limit=args.budget, seed_metrics=("wanda",), baselines=("magnitude", "wanda"),
                        hof_size=2, heldout_chunks=args.heldout_chunks, seed=args.seed, data_dir=args.data_dir)


def run_dir(args, structure) -> Path:
    return Path(args.runs) / f"{structure.replace(':', 'of')}-{args.update}"


def search(args, structure) -> dict:
    path = run_dir(args, structure)
    if (path / "hall_of_fame.json").is_file() and not args.more:
        return json.loads((path / "hall_of_fame.json").read_text())
    log = lambda s: print(f"[{path.name}] {s}", flush=True)  # noqa: E731
    if (path / "checkpoint.json").is_file():  # unfinished, or given --more seconds to go on
        return run_evolve(resume=path, time_limit=args.more, generations=args.generations, log=log, quiet=True)
    return run_evolve(config(args, structure), path, log=log, quiet=True)


def proxy_ranking(run: RunDir, update: str) -> dict:
    """Spearman of mask-only (first stage) and reconstructed (last stage) search perplexity."""
    proxy, full = {}, {}
    for r in run.read_lines("evaluations.jsonl"):
        if r.get("gen") == "baselines" or r["perplexity"] is None:
            continue
        key = r["key"].removesuffix(f" +{update}")
        (full if r["update"] == update else proxy)[key] = r["perplexity"]
    pairs = [(proxy[k], full[k]) for k in full if k in proxy]
    return dict(pairs=len(pairs), spearman=spearman(*zip(*pairs)) if len(pairs) > 2 else None)


def sequential_rows(args, structure, metric: str) -> dict:
    """The best recipe applied sequentially (as `prunerzero apply` does), on the held-out chunks."""
    model, tok = load_model(None)
    samples, ids, starts = calibration_for(tok, "wikipedia", 32, 512, args.seed, args.data_dir)
    ev = eval_data_for(tok, None, 512, args.heldout_chunks, args.data_dir, "wikipedia", ids, starts)
    t0 = time.perf_counter()
    report = apply_metric(model, metric, 0.5, structure, calibration=samples, update=args.update, progress=False)
    prune_s = time.perf_counter() - t0
    return dict(metric=metric, perplexity=perplexity(model, ev.chunks), prune_s=prune_s, sparsity=report.sparsity,
                eval=ev.source, update=report.update)


def pruning_row(method, structure, chunks) -> float | None:
    f = RESULTS / "bench_pruning.json"
    r = json.loads(f.read_text())["results"].get(row_key(method, structure, 0.5, 32, chunks)) if f.is_file() else None
    return r and {"perplexity": r["perplexity"], "prune_s": r.get("prune_s")}


def time_limits(args, structure, before: dict) -> list:
    """The limit of each call that ran this search (`before`: its earlier results row, if any):
    the first, then every --more."""
    first = before.get("time_limits") or [json.loads((run_dir(args, structure) / "config.json").read_text())["time_limit"]]
    return first + [args.more] if args.more else first


def summary(args, structure, hof, before: dict) -> dict:
    run = RunDir(run_dir(args, structure))
    log = run.read_lines("log.jsonl")
    best = hof["hall_of_fame"][0]
    out = dict(generations=len(log), search_s=log[-1]["elapsed_s"], time_limits=time_limits(args, structure, before),
               candidates=log[-1]["candidates"], evaluations=log[-1]["evaluations"], best_metric=best["simplified"],
               curve=[(r["elapsed_s"], r["best"]) for r in log], hall_of_fame=hof["hall_of_fame"],
               baselines=hof["baselines"], dense=hof["dense"], carry_over=carry_over(hof),
               search_source=hof["search"]["source"], heldout_source=hof["heldout"]["source"],
               proxy=proxy_ranking(run, args.update))
    out["sequential"] = sequential_rows(args, structure, best["simplified"])
    out["sparsegpt"] = pruning_row("sparsegpt", structure, args.heldout_chunks)
    out["wanda_update"] = pruning_row(f"wanda+{args.update}", structure, args.heldout_chunks)
    return out


def plot(data, out: Path):
    structures = list(data["runs"])
    fig, axes = figure_row(len(structures))
    for ax, st in zip(axes, structures):
        r = data["runs"][st]
        t, best = zip(*[(e / 60, b) for e, b in r["curve"] if b is not None])
        ax.step(t, best, where="post", marker=".", label=f"best recipe (metric + {data['settings']['update']})")
        ax.axhline(r["baselines"]["wanda"]["search_perplexity"], ls="--", color="C3",
                   label=f"wanda + {data['settings']['update']}")
        curve_axes(ax, f"{st}, sparsity 0.5", f"search perplexity ({r['search_source']}, 8 chunks)")
    save_figure(fig, out)


def report(data, out: Path):
    s, u = data["settings"], data["settings"]["update"]
    lines = ["# Recipe search on SmolLM2-135M (bundled)", "",
             f"Sparsity 0.5; `evolve --update {u}`, seeded with Wanda; calibration 32 x 512 tokens of wikipedia, "
             f"seed {s['seed']}; population 16, stages (2, 8) chunks, the first ranked by the mask alone, the "
             f"second by the reconstructed model (promote 0.25); time limits (s) per call as listed; "
             f"{s['cpu']}, {s['threads']} threads, torch {s['torch']}. Search text: held-out Wikipedia (disjoint "
             "from calibration); held-out text: the first 64 chunks of WikiText-2 test (512 tokens).", "",
             "| structure | time limits (s) | search s | generations | candidates | best recipe | search ppl (one-shot) | Wanda+update search | "
             "held-out (one-shot) | Wanda+update held-out | carry-over ratio | proxy Spearman (pairs) |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for st, r in data["runs"].items():
        best, w, c, p = r["hall_of_fame"][0], r["baselines"]["wanda"], r["carry_over"] or {}, r["proxy"]
        limits = " + ".join(f"{t:.0f}" for t in r.get("time_limits") or [s["budget"]])
        lines.append(f"| {st} | {limits} | {r['search_s']:.0f} | {r['generations']} | {r['candidates']} | `{r['best_metric']}` + {u} | "
                     f"{_f(best['search_perplexity'])} | {_f(w['search_perplexity'])} | {_f(best['heldout_perplexity'])} | "
                     f"{_f(w['heldout_perplexity'])} | {_f(c.get('ratio'))} | {_f(p['spearman'])} ({p['pairs']}) |")
    lines += ["", "Applied sequentially (as `prunerzero apply` prunes), held-out WikiText-2, 64 x 512:", "",
              "| structure | best recipe | its prune time | SparseGPT | its prune time | Wanda + update | vs SparseGPT |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for st, r in data["runs"].items():
        q, sg, wu = r["sequential"], r["sparsegpt"] or {}, r["wanda_update"] or {}
        gain = f"{q['perplexity'] / sg['perplexity'] - 1:+.1%}" if sg else ""
        lines.append(f"| {st} | {_f(q['perplexity'])} | {q['prune_s']:.0f} s | {_f(sg.get('perplexity'))} | "
                     f"{_f(sg.get('prune_s'))} s | {_f(wu.get('perplexity'))} | {gain} |")
    lines += ["", "Prune times share a 2-core CPU with other work; bench_pruning's `times` part is the clean "
              "comparison."]
    out.write_text("\n".join(lines) + "\n")


def _f(x):
    return "" if x is None else f"{x:.3f}" if isinstance(x, float) and math.isfinite(x) else str(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structures", default="unstructured,2:4")
    ap.add_argument("--budget", type=float, default=2700.0, help="seconds of generations per search")
    ap.add_argument("--more", type=float, default=None,
                    help="resume finished searches for this many more seconds (evolve --resume --time-limit)")
    ap.add_argument("--generations", type=int, default=None, help="with --more: extend the runs to this many at most")
    ap.add_argument("--update", default="admm")
    ap.add_argument("--heldout-chunks", type=int, default=64)
    common_options(ap, "bench_recipe_search")
    args = ap.parse_args()
    if args.report_only:
        data = json.loads(Path(args.out + ".json").read_text())
        report(data, Path(args.out + ".md"))
        return plot(data, Path(args.out + ".png"))
    old = Path(args.out + ".json")
    data = json.loads(old.read_text()) if old.is_file() else dict(runs={})
    data["settings"] = dict(budget=args.budget, update=args.update, seed=args.seed, threads=torch.get_num_threads(),
                            torch=torch.__version__, cpu=platform.processor() or "cpu")
    for st in args.structures.split(","):
        run = summary(args, st, search(args, st), data["runs"].get(st, {}))
        if old.is_file():  # another structure's run may have written meanwhile: keep its rows
            data["runs"] = json.loads(old.read_text())["runs"]
        data["runs"][st] = run
        Path(args.out + ".json").write_text(json.dumps(data, indent=2))
        report(data, Path(args.out + ".md"))
        plot(data, Path(args.out + ".png"))
    print(Path(args.out + ".md").read_text())


if __name__ == "__main__":
    main()
