"""How well each stage of a recipe search ranks candidates like its last, faithful stage, and
what each stage costs: candidates per hour.

    python experiments/bench_stage_check.py [--candidates 20] [--stages 1,4,8] [--update admm]
    python experiments/bench_stage_check.py --from-run RUN     # the figures of a run made already

Runs `prunerzero evolve --stage-check N` on the default model (one short generation after the
check; the check is the point): N varied candidates (the baselines, Wanda, mutants of Wanda,
then random trees) scored on every stage, the last one pruning each candidate sequentially as `apply` does. From
RUN/stage_check.json and RUN/evaluations.jsonl it writes, per stage, the Spearman correlation
with the last stage and the measured candidates per hour (one process, the machine's threads),
to results/bench_stage_check.{json,md} and a scatter plot of each stage against the last.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import torch

from common import common_options, figure_row, save_figure
from prunerzero.search.fidelity import USABLE
from prunerzero.search.fidelity import usable_spearman as fidelity_usable


def evolve_command(args, run: Path) -> list[str]:
    return [sys.executable, "-m", "prunerzero.cli", "evolve", "--output", str(run), "--update", args.update,
            "--seed-metrics", "wanda", "--stages", args.stages, "--stage-check", str(args.candidates),
            "--generations", "1", "--population", "2", "--elite", "1", "--baselines", "magnitude,wanda",
            "--heldout-chunks", "8", "--seed", str(args.seed), "--quiet"]


def stage_rates(run: Path, check: dict, screen_tokens: int | None = None) -> list[dict]:
    """Seconds per candidate of each stage in the check: the evaluations that prune as the stage
    does, on the same chunks (the first stage's shortened ones under --screen-tokens), up to its
    chunk count (a stage that extends an earlier measurement of the same kind pays for both
    pieces), over the candidates it measured; cached answers are not counted."""
    rows = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["gen"] in ("stage-check", "baselines") and not r["cached"]]

    def mode(r):
        return "sequential" if r.get("sequential") else "mask" if r["update"] == "none" else "one-shot"

    def screened(r):
        return r["fingerprint"].endswith(" on screen")
    out = []
    for s in check["stages"]:
        screen = bool(screen_tokens) and s["stage"] == 1
        mine = [r for r in rows if mode(r) == s["pruning"] and r["chunks"][1] <= s["chunks"]
                and screened(r) == screen]
        n = sum(r["chunks"][1] == s["chunks"] for r in mine)
        seconds = sum(r["seconds"] for r in mine)
        out.append(dict(stage=s["stage"], measured=n, seconds_per_candidate=seconds / n if n else None,
                        candidates_per_hour=3600 * n / seconds if seconds else None))
    return out


def usable_spearman(check: dict, stage: int) -> tuple[float | None, int]:
    """fidelity.usable_spearman of `stage` against the last (recomputed here for checks written
    before stage_check reported it)."""
    return fidelity_usable([(c["perplexity"][stage - 1], c["perplexity"][-1]) for c in check["candidates"]
                            if c["perplexity"][stage - 1] is not None and c["perplexity"][-1] is not None])


def report(data: dict, out: Path) -> None:
    s = data["settings"]
    lines = [f"# Stage check: how each stage ranks like the last ({s['threads']} threads, {s['machine']}, "
             f"torch {s['torch']})", "",
             f"`{s['command']}`", "",
             f"{len(data['check']['candidates'])} varied candidates (listed below: the baselines and Wanda first), "
             f"each scored on every stage"
             + (f" (the first on the first {s['config']['screen_tokens']} tokens of each chunk)"
                if s["config"].get("screen_tokens") else "") + ";"
             f" Spearman's rank correlation of each stage's perplexities with "
             f"the last stage's, over the candidates finite on both. Candidates per hour: measured in the check, "
             f"one process.", "",
             f"'Usable': candidates whose last-stage perplexity is within {USABLE:g}x the best's, the near-misses "
             f"promotion has to order (degenerate metrics are easy to rank).", "",
             "| stage | chunks | pruning | Spearman with the last | finite | Spearman, usable | usable | "
             "s / candidate | candidates / hour |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for st, rate in zip(data["check"]["stages"], data["rates"]):
        rho = "" if st["spearman"] is None else f"{st['spearman']:+.3f}"
        sec = "" if rate["seconds_per_candidate"] is None else f"{rate['seconds_per_candidate']:.1f}"
        per_h = "" if rate["candidates_per_hour"] is None else f"{rate['candidates_per_hour']:.0f}"
        tokens = s["config"].get("screen_tokens") if st["stage"] == 1 else None
        pruning = st["pruning"] + (f", first {tokens} tokens" if tokens else "")
        good, n_good = usable_spearman(data["check"], st["stage"])
        good = "" if good is None else f"{good:+.3f}"
        lines.append(f"| {st['stage']} | {st['chunks']} | {pruning} | {rho} | {st['candidates']} | {good} | {n_good} | "
                     f"{sec} | "
                     f"{per_h} |")
    lines += ["", "| candidate | " + " | ".join(f"stage {st['stage']}" for st in data["check"]["stages"]) + " |",
              "|---|" + "---:|" * len(data["check"]["stages"])]
    for c in sorted(data["check"]["candidates"], key=lambda c: c["perplexity"][-1] or math.inf):
        figs = " | ".join("" if p is None else f"{p:.2f}" for p in c["perplexity"])
        lines.append(f"| `{c['metric'][:60]}` | {figs} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12 + len(data['check']['stages'])]))
    plot(data, out.with_suffix(".png"))


def plot(data: dict, path: Path) -> None:
    stages = data["check"]["stages"][:-1]
    if not stages:
        return
    fig, axes = figure_row(len(stages), 4.5, 4)
    for ax, st in zip(axes, stages):
        pairs = [(c["perplexity"][st["stage"] - 1], c["perplexity"][-1]) for c in data["check"]["candidates"]
                 if c["perplexity"][st["stage"] - 1] and c["perplexity"][-1]]
        if pairs:
            ax.scatter(*zip(*pairs), s=14)
        rho = "n/a" if st["spearman"] is None else f"{st['spearman']:+.2f}"
        ax.set(xscale="log", yscale="log", xlabel=f"stage {st['stage']} ({st['pruning']}, {st['chunks']} chunks)",
               ylabel="last stage (sequential)", title=f"Spearman {rho}")
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--stages", default="1,4,8")
    ap.add_argument("--update", default="admm")
    ap.add_argument("--from-run", default=None, help="A run folder made already (its command is not rerun).")
    common_options(ap, "bench_stage_check")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report_only:
        return report(json.loads(out.with_suffix(".json").read_text()), out)
    run = Path(args.from_run) if args.from_run else Path(args.runs) / "run"
    command = evolve_command(args, run)
    if not args.from_run:
        subprocess.run(command, check=True)
    check = json.loads((run / "stage_check.json").read_text())
    config = json.loads((run / "config.json").read_text())
    shown = (" ".join(["prunerzero", *command[3:]]) if not args.from_run else
             f"prunerzero evolve ... (run folder {run}; every setting in settings.config)")
    data = dict(settings=dict(command=shown, threads=torch.get_num_threads(), machine=platform.machine(),
                              torch=torch.__version__, config=config),
                check=check, rates=stage_rates(run, check, config.get("screen_tokens")))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    report(data, out)


if __name__ == "__main__":
    main()
