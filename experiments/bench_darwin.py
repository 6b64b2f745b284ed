"""DarwinLM structured pruning on the default model: evolved allocation against the uniform
and per-layer-error allocations at the same parameter count, before and after the same
post-training, and the speed of the saved smaller model against the dense one.

    python experiments/bench_darwin.py [--targets 0.6,0.4] [--generations 10] [--finetune-tokens 32768] [--full]

Each target is one `prunerzero darwin` run in --runs (default experiments/runs/bench_darwin, git-ignored);
a rerun resumes an unfinished run and reuses finished ones. Latency is measured here, dense and
pruned alternating in the same process (batch 1 and 8, seqlen 512), and reported as a ratio.
Writes results/bench_darwin.{json,md} and results/bench_darwin_allocation.png.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from common import common_options
from prunerzero.loading import load_model
from prunerzero.structured.config import DarwinConfig
from prunerzero.structured.run import run_darwin
from prunerzero.structured.shrink import load_structured
from prunerzero.structured.speed import latency


def one_run(args, target) -> dict:
    run = Path(args.runs) / f"target-{target}"
    if (run / "report.json").is_file():
        return json.loads((run / "report.json").read_text())
    if (run / "checkpoint.json").is_file():
        return run_darwin(resume=run)
    cfg = DarwinConfig(target=target, generations=args.generations, offspring=args.offspring,
                       finetune_tokens=args.finetune_tokens, finetune_lr=args.finetune_lr, eval_full=args.full,
                       data_dir=args.data_dir, speed=False, seed=args.seed)
    return run_darwin(cfg, run)


def speed(args, target, dense) -> dict:
    small = load_structured(Path(args.runs) / f"target-{target}" / "model")
    out = {}
    for batch in (1, 8):
        pairs = [(latency(dense, batch, 512, repeats=1)["median_s"], latency(small, batch, 512, repeats=1)["median_s"])
                 for _ in range(args.repeats)]
        d, s = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        out[f"batch{batch}"] = dict(dense_s=d, pruned_s=s, speedup=d / s, dense_tok_s=batch * 512 / d,
                                    pruned_tok_s=batch * 512 / s)
    return out


def report(data, out: Path):
    s = data["settings"]
    lines = [f"# DarwinLM structured pruning of {s['model']}", "",
             f"Database: {s['nsamples']} x {s['seqlen']} tokens of wikipedia, ladder of tenths, MLP channels in "
             f"multiples of 8. Search: {s['generations']} generations of {s['offspring']} offspring, stages "
             f"{s['stages']} (train tokens, scoring tokens, survivors), seed {s['seed']}. Post-training: "
             f"{s['finetune_tokens']} tokens, lr {s['finetune_lr']}. {s['threads']} CPU threads, torch {s['torch']}.", "",
             "| kept (prunable) | params (model) | allocation | ppl 64x512 | + post-training | ppl whole split | "
             "+ post-training |", "|---|---:|---|---:|---:|---:|---:|"]
    first = next(iter(data["targets"].values()))
    dense_full = first.get("perplexity_full", {}).get("dense")
    lines.append(f"| 1.000 | {first['params']['dense_total']:,} | dense | {first['perplexity']['dense']:.2f} | | "
                 f"{'' if dense_full is None else f'{dense_full:.2f}'} | |")
    for r in data["targets"].values():
        sets = (r["perplexity"], r.get("perplexity_full", {}))
        for name in ("evolved", "uniform", "per-layer error"):
            cells = [f"{d[k]:.2f}" if k in d else "" for d in sets for k in (name, f"{name} + finetune")]
            lines.append(f"| {r['params']['kept_fraction']:.3f} | {r['params']['model_total']:,} | {name} | "
                         + " | ".join(cells) + " |")
    lines += ["", "| kept | search s | database s | batch 1 x 512: dense s / pruned s (speedup) | "
              "batch 8 x 512: dense s / pruned s (speedup) |", "|---|---:|---:|---|---|"]
    for t, r in data["targets"].items():
        sp = data["speed"].get(t, {})
        cell = lambda b: f"{sp[b]['dense_s']:.3f} / {sp[b]['pruned_s']:.3f} ({sp[b]['speedup']:.2f}x)" if b in sp else ""
        lines.append(f"| {r['params']['kept_fraction']:.3f} | {r['timings']['search_s']:.0f} | "
                     f"{_db_time(r['timings'])} | {cell('batch1')} | {cell('batch8')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(data, out)


def _db_time(t: dict) -> str:
    """The database's build time; a run that reused a database built earlier says so."""
    if t.get("database_build_s"):
        return f"{t['database_build_s']:.0f}"
    return "(cached)" if t["database_s"] < 5 else f"{t['database_s']:.0f}"


def plot(data, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    targets = list(data["targets"].items())
    fig, axes = plt.subplots(len(targets), 2, figsize=(11, 3.4 * len(targets)), squeeze=False)
    for row, (t, r) in enumerate(targets):
        for col, key in enumerate(("heads", "channels")):
            ax = axes[row][col]
            for name, layers in r["allocations"].items():
                ax.plot([x[key] for x in layers], marker="o", ms=3, label=name)
            ax.set(title=f"kept {r['params']['kept_fraction']:.2f}: {'query heads' if col == 0 else 'MLP channels'}",
                   xlabel="layer")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.parent / (out.name + "_allocation.png"), dpi=110)
    plt.close(fig)


def allocations(target_report, db_levels) -> dict:
    n = len(db_levels["attn"])
    return {name: [dict(heads=len(db_levels["attn"][i][g[i]].kept), channels=len(db_levels["mlp"][i][g[n + i]].kept))
                   for i in range(n)] for name, g in target_report["genomes"].items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="0.6,0.4")
    ap.add_argument("--generations", type=int, default=10)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--finetune-tokens", type=int, default=32768)
    ap.add_argument("--finetune-lr", type=float, default=1e-5)
    ap.add_argument("--full", action="store_true", help="Also the whole WikiText-2 test split.")
    ap.add_argument("--repeats", type=int, default=3)
    common_options(ap, "bench_darwin")
    args = ap.parse_args()
    if args.report_only:
        return report(json.loads(Path(args.out).with_suffix(".json").read_text()), Path(args.out))
    from prunerzero.structured.database import Database
    dense, _ = load_model(None, tokenizer=False)
    data = {"targets": {}, "speed": {}}
    for t in (float(x) for x in args.targets.split(",")):
        r = one_run(args, t)
        r["allocations"] = allocations(r, Database(json.loads(
            (Path(args.runs) / f"target-{t}" / "config.json").read_text())["database"]).levels)
        data["targets"][str(t)] = r
        data["speed"][str(t)] = speed(args, t, dense)
        save(args, data)  # after every target, so a long run leaves what it has measured
    print(Path(args.out).with_suffix(".md").read_text())


def save(args, data):
    cfg = next(iter(data["targets"].values()))["settings"]
    data["settings"] = dict(model="SmolLM2-135M-Instruct (bundled)", nsamples=cfg["nsamples"], seqlen=cfg["seqlen"],
                            generations=args.generations, offspring=args.offspring, stages=cfg["stages"],
                            seed=args.seed, finetune_tokens=args.finetune_tokens, finetune_lr=args.finetune_lr,
                            threads=torch.get_num_threads(), torch=torch.__version__, machine=platform.machine())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    report(data, out)


if __name__ == "__main__":
    main()
