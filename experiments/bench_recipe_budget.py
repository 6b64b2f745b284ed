"""Faithful recipe searches and their budget curves: evolution against random search and the seed.

    python experiments/bench_recipe_budget.py [--patterns 0.5,2:4,0.7] [--strategies evolution,random]
        [--search-seeds 0,1] [--budget 7200] [--workers 2]

Each (pattern, strategy, search seed) is one `prunerzero evolve` run over the whole recipe
(`--search metric,update`, and allocation at 70%), seeded with the catalog's best masks
(`sqr(W)*X`, the mask of sqrtx-admm, and Wanda) and starting from --update. Stages: a mask-only
screen on one 256-token chunk, the mask alone on 2 whole chunks, then the faithful stage: the
candidate pruned sequentially as `apply` prunes it (from --fitness-samples calibration windows)
on 8 chunks. No one-shot reconstruction stage: it ranked like the faithful stage worse than
the mask alone (Spearman 0.65 against 0.77 over 20 candidates, bench_stage_check) at 13x its
cost. The search text is held-out Wikipedia; the hall of fame is re-scored at the end
on WikiText-2 (64 x 512), pruned as the faithful stage prunes (from the same windows; the
recipes applied from all 32 windows, at two calibration seeds, are experiments/heldout_check.py's
rows). The search seed is also the seed of the calibration draw.

The runs go one after the other (one heavy job at a time on a small CPU); each lives in --runs
(git-ignored), and a rerun resumes unfinished runs and reuses finished ones, so the table can
grow over several sittings. The curve of a run is its best faithful search perplexity after
each generation, against candidates generated and against search time; the seed line is the
faithful perplexity of the run's first seed recipe, measured in generation 0.

Writes results/bench_recipe_budget.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import torch

from common import RESULTS, common_options, curve_axes, figure_row, save_figure
from prunerzero.language.metric import catalog
from prunerzero.runs.rundir import RunDir
from prunerzero.search.config import SearchConfig
from prunerzero.search.run import run_evolve

PATTERNS = {"0.5": (0.5, "unstructured"), "2:4": (None, "2:4"), "4:8": (None, "4:8"), "0.7": (0.7, "unstructured")}
COLORS = {"evolution": "C0", "random": "C1", "evolution+fast-track": "C4", "random+fast-track": "C5"}
SEEDS = ("evolved-smollm2-2of4", "wanda")   # sqr(W)*X (sqrtx-admm's mask) first, then Wanda


def config(args, pattern: str, strategy: str, seed: int) -> SearchConfig:
    sparsity, structure = PATTERNS[pattern]
    search = ("metric", "update") + (("allocation",) if sparsity and sparsity >= 0.6 else ())
    return SearchConfig(sparsity=sparsity, structure=structure, strategy=strategy, update=args.update,
                        seed_metrics=SEEDS, search=search, stages=(1, 2, 8), proxy_stages=2, promote=0.35,
                        screen_tokens=256, fitness_samples=args.fitness_samples, search_data="wikipedia-heldout",
                        baselines=("wanda",), population=16, generations=100_000, time_limit=args.budget,
                        workers=args.workers, threads=1, hof_size=3, seed=seed, data_dir=args.data_dir,
                        fast_track=args.fast_track, fixed_settings=tuple(filter(None, args.fixed_settings.split(","))))


def run_dir(args, pattern, strategy, seed) -> Path:
    fixed = "".join(f"-{name}" for name in filter(None, args.fixed_settings.split(",")))
    return Path(args.runs) / f"{pattern.replace(':', 'of')}-{strategy}{'-fast' * args.fast_track}{fixed}-s{seed}"


def search(args, pattern, strategy, seed) -> dict:
    """A finished run's hall of fame: run fresh, resumed where it stopped, or read back."""
    path = run_dir(args, pattern, strategy, seed)
    if (path / "hall_of_fame.json").is_file():
        return json.loads((path / "hall_of_fame.json").read_text())
    log = lambda s: print(f"[{path.name}] {s}", flush=True)  # noqa: E731
    if (path / "checkpoint.json").is_file():
        return run_evolve(resume=path, log=log, quiet=True)
    return run_evolve(config(args, pattern, strategy, seed), path, log=log, quiet=True)


def faithful(rows: list) -> list:
    """The evaluations of the faithful (sequential, last) stage."""
    return [r for r in rows if r.get("sequential") and r["perplexity"] is not None]


def seed_fitness(rows: list, update: str) -> float | None:
    """The faithful perplexity of the first seed recipe (the first seed metric, --update's settings)."""
    key = catalog()[SEEDS[0]].canonical()
    found = [r["perplexity"] for r in faithful(rows) if r["key"].startswith(key + " ") and r["update"] == update]
    return found[0] if found else None


def summary(args, pattern, strategy, seed, hof: dict) -> dict:
    run = RunDir(run_dir(args, pattern, strategy, seed))
    log, evals = run.read_lines("log.jsonl"), run.read_lines("evaluations.jsonl")
    best = hof["hall_of_fame"][0]
    wanda = hof["baselines"].get("wanda", {})
    settings = json.loads((run.path / "config.json").read_text())
    return dict(pattern=pattern, strategy=strategy + ("+fast-track" if settings.get("fast_track") else ""), seed=seed,
                update=settings["update"], fixed_settings=settings.get("fixed_settings", []),
                time_limit=settings["time_limit"], generations=len(log),
                search_s=log[-1]["elapsed_s"] if log else None, candidates=log[-1]["candidates"] if log else 0,
                faithful_evaluations=len(faithful(evals)),
                curve=[(r["elapsed_s"], r["candidates"], r["best"]) for r in log],
                seed_search=seed_fitness(evals, settings["update"]),
                wanda_search=wanda.get("search_perplexity"), wanda_heldout=wanda.get("heldout_perplexity"),
                best=dict(metric=best["simplified"], update=best.get("update"), allocation=best.get("allocation"),
                          search=best["search_perplexity"], heldout=best["heldout_perplexity"]))


def plot(data, out: Path):
    """A row per pattern: each run's best faithful search perplexity, as a percentage against
    its own seed recipe (so runs at other search seeds, whose calibration differs, overlay),
    against candidates and against search time; Wanda + the start update once per seed."""
    patterns = sorted({r["pattern"] for r in data["runs"]})
    fig, axes = figure_row(2 * len(patterns), width=5, rows=len(patterns))   # a row per pattern
    for j, pattern in enumerate(patterns):
        runs = [r for r in data["runs"] if r["pattern"] == pattern]
        for ax, (x, label) in zip(axes[2 * j:2 * j + 2], ((1, "candidates generated"), (0, "search time (min)"))):
            ax.axhline(0, color="C2", ls=":", lw=1, label="seed recipe (each run's own)")
            drawn = set()
            for r in runs:
                pts = [(p[x] / (60 if x == 0 else 1), _against(p[2], r)) for p in r["curve"] if p[2] is not None]
                if pts:
                    ax.step(*zip(*pts), where="post", marker=".", color=COLORS.get(r["strategy"], "C5"),
                            ls="-" if r["seed"] == 0 else "--", label=f"{r['strategy']}, seed {r['seed']}")
                if r["wanda_search"] and r["seed"] not in drawn:
                    drawn.add(r["seed"])
                    ax.axhline(_against(r["wanda_search"], r), color="C3", ls=":" if r["seed"] == 0 else "-.", lw=1,
                               label=f"Wanda + update, seed {r['seed']}")
            curve_axes(ax, f"{_label(pattern)}: best faithful search perplexity", "% against the seed recipe", label)
    save_figure(fig, out)


def _against(value: float, run: dict) -> float:
    """A search perplexity as a percentage above (+) or below (-) the run's seed recipe's."""
    return 100 * (value / run["seed_search"] - 1)


def report(data, out: Path):
    s = data["settings"]
    lines = ["# Faithful recipe searches on SmolLM2-135M (bundled): budget curves", "",
             f"`evolve --update UPDATE --seed-metrics {','.join(SEEDS)} --search metric,update` (+ "
             "allocation at 60% and more), stages 1 / 2 / 8 chunks: a mask-only screen on 256 tokens, the mask "
             f"alone on whole chunks, then the recipe pruned sequentially as `apply` prunes it from {s['fitness_samples']} "
             f"calibration windows (the faithful stage); population 16, promote 0.35; search text held-out "
             f"Wikipedia; {s['workers']} workers of one thread; {s['cpu']}, "
             f"torch {s['torch']}. The search seed is also the calibration seed. Held-out: WikiText-2 64 x 512, "
             "pruned as the faithful stage prunes.", "",
             "| pattern | start update | strategy | seed | time limit s | generations | candidates | faithful evals | search s | seed recipe (search) | "
             "Wanda + update (search) | best (search) | best (held-out) | Wanda + update (held-out) | best recipe |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in data["runs"]:
        b = r["best"]
        searched = b.get("allocation") and set(b["allocation"]) != {"0"}   # all "0": every layer at the target
        recipe = f"`{b['metric']}` + `{b['update']}`" + (f", allocation `{b['allocation']}`" if searched else
                                                         ", uniform" if b.get("allocation") else "")
        fixed = f" (fixed: {', '.join(r['fixed_settings'])})" if r.get("fixed_settings") else ""
        lines.append(f"| {r['pattern']} | `{r.get('update', s['update'])}`{fixed} | {r['strategy']} | {r['seed']} | {_f(r['time_limit'], 0)} | {r['generations']} | {r['candidates']} | "
                     f"{r['faithful_evaluations']} | {_f(r['search_s'], 0)} | {_f(r['seed_search'])} | "
                     f"{_f(r['wanda_search'])} | {_f(b['search'])} | {_f(b['heldout'])} | {_f(r['wanda_heldout'])} | "
                     f"{recipe} |")
    out.write_text("\n".join(lines) + "\n")


def _label(pattern: str) -> str:
    """"0.5" -> "50% unstructured"; an N:M pattern as it is."""
    return pattern if ":" in pattern else f"{float(pattern):.0%} unstructured"


def _f(x, digits=3):
    return "" if x is None else f"{x:.{digits}f}" if isinstance(x, float) and math.isfinite(x) else str(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patterns", default="0.5")
    ap.add_argument("--strategies", default="evolution,random")
    ap.add_argument("--search-seeds", default="0,1")
    ap.add_argument("--budget", type=float, default=7200.0, help="seconds for each whole run")
    ap.add_argument("--update", default="admm correct=0.2")
    ap.add_argument("--fitness-samples", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fixed-settings", default="",
                    help="evolve --fixed-settings: update settings kept as --update gives them (percdamp,correct)")
    ap.add_argument("--fast-track", action="store_true",
                    help="evolve --fast-track: new updates of hall-of-fame masks skip the mask-only ranking")
    common_options(ap, "bench_recipe_budget")
    args = ap.parse_args()
    out = Path(args.out)
    data = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else None
    if not args.report_only:
        runs = {(r["pattern"], r["strategy"], r["seed"]): r for r in (data or {}).get("runs", [])}
        for pattern in args.patterns.split(","):
            for seed in map(int, args.search_seeds.split(",")):
                for strategy in args.strategies.split(","):
                    hof = search(args, pattern, strategy, seed)
                    row = summary(args, pattern, strategy, seed, hof)   # its strategy names --fast-track
                    runs[row["pattern"], row["strategy"], row["seed"]] = row
                    data = dict(settings=dict(update=args.update, fitness_samples=args.fitness_samples,
                                              budget=args.budget, workers=args.workers,
                                              cpu=platform.processor() or platform.machine(),
                                              torch=torch.__version__),
                                runs=sorted(runs.values(), key=lambda r: (r["pattern"], r["seed"], r["strategy"])))
                    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    report(data, out.with_suffix(".md"))
    plot(data, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
