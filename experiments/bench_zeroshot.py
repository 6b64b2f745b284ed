"""Zero-shot accuracy beside perplexity for the main pruning rows (issue 15).

    PRUNERZERO_DATA_DIR=../shared/data python experiments/bench_zeroshot.py [--tasks wiki_lastword] [--limit N]

The default model, dense and pruned sequentially with 32 x 512 Wikipedia calibration tokens
(seed 0): magnitude 50%, Wanda 50%, Wanda 2:4, SparseGPT 50%, Wanda + ADMM 50%; and the darwin
models of results/bench_darwin.json (its evolved and uniform genomes, rebuilt from the level
database with the same settings, then post-trained as there). Each row:
WikiText-2 perplexity (--chunks chunks of 512) and lm-eval accuracy on --tasks (default: the
offline last-word task built from Wikipedia summaries, see prunerzero/zeroshot.py). Writes
results/bench_zeroshot.{json,md}; rows already in the JSON are kept (--redo to measure again).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from common import RESULTS, common_options
from prunerzero import apply_metric, apply_sparsegpt, perplexity
from prunerzero.loading import load_model
from prunerzero.pipeline import calibration_for, eval_data_for
from prunerzero.zeroshot import OFFLINE_TASK, run_tasks

ROWS = {  # name -> (method, structure, update)
    "dense": (None, None, None),
    "magnitude 50%": ("magnitude", "unstructured", "none"),
    "wanda 50%": ("wanda", "unstructured", "none"),
    "wanda 2:4": ("wanda", "2:4", "none"),
    "sparsegpt 50%": ("sparsegpt", "unstructured", None),
    "wanda+admm 50%": ("wanda", "unstructured", "admm"),
}
# darwin rows: name -> (target in bench_darwin.json, genome); all post-trained
DARWIN = {f"darwin {t} {g}": (t, g) for t in ("0.6", "0.4") for g in ("evolved", "uniform")}


def darwin_model(model, tok, name, data_dir):
    """The smaller model of a bench_darwin row: its genome over a level database built with the
    bench's settings (the cached one when it exists), post-trained as the bench did."""
    from prunerzero.structured.config import DarwinConfig
    from prunerzero.structured.database import build_database
    from prunerzero.structured.run import darwin_data, database_path, finetune
    from prunerzero.structured.shrink import materialize
    record = json.loads((RESULTS / "bench_darwin.json").read_text())
    target, genome = DARWIN[name]
    t, s = record["targets"][target], record["settings"]
    c = DarwinConfig(target=float(target), nsamples=s["nsamples"], seqlen=s["seqlen"], seed=s["seed"],
                     finetune_tokens=s["finetune_tokens"], finetune_lr=s["finetune_lr"], data_dir=data_dir)
    data = darwin_data(tok, c)
    path, settings = database_path(c, data.calibration)
    db = build_database(model, data.calibration, path, settings, c.ladder, c.multiple, c.percdamp)
    small = materialize(model, db, t["genomes"][genome])
    finetune(small, data.fitness, c, progress=False)
    kept = sum(p.numel() for p in small.parameters())
    return small, dict(params=kept, bench_darwin_perplexity=t["perplexity"][f"{genome} + finetune"])


def measure(model, dense, tok, name, samples, chunks, tasks, limit, data_dir=None) -> dict:
    model.load_state_dict(dense)
    t0 = time.perf_counter()
    extra = {}
    if name in DARWIN:
        model, extra = darwin_model(model, tok, name, data_dir)
        method = None
    else:
        method, structure, update = ROWS[name]
    if method == "sparsegpt":
        apply_sparsegpt(model, 0.5, structure, calibration=samples, progress=False)
    elif method is not None:
        apply_metric(model, method, 0.5, structure, calibration=samples, update=update, progress=False)
    prune_s = time.perf_counter() - t0
    ppl = perplexity(model, chunks, progress=False)
    t1 = time.perf_counter()
    zs = run_tasks(model, tok, tasks, limit=limit)
    return dict(name=name, perplexity=ppl, zero_shot=zs, prune_s=prune_s, tasks_s=time.perf_counter() - t1, **extra)


def report(data, out: Path):
    s = data["settings"]
    tasks = s["tasks"]
    head = " | ".join(f"{t} acc (± stderr)" for t in tasks)
    limited = "" if s["limit"] is None else f" (first {s['limit']} documents of each)"
    lines = [f"# Zero-shot accuracy beside perplexity ({s['threads']} threads, {s['machine']}, torch {s['torch']}, "
             f"lm-eval {s['lm_eval']})", "",
             f"The default model, sequential, calibration 32 x 512 Wikipedia tokens, seed {s['seed']}; perplexity on "
             f"WikiText-2 {s['chunks']} x 512; lm-eval zero-shot on {', '.join(tasks)}{limited}.", "",
             f"| model | WT2 perplexity | {head} |", "|---|---:|" + "---:|" * len(tasks)]
    for r in data["rows"]:
        cells = " | ".join(f"{r['zero_shot'][t]['acc']:.4f} (± {r['zero_shot'][t]['acc_stderr']:.4f})" for t in tasks)
        label = r["name"] if "params" not in r else f"{r['name']} ({r['params'] / 1e6:.1f}M parameters, post-trained)"
        lines.append(f"| {label} | {r['perplexity']:.3f} | {cells} |")
    darwin = [r for r in data["rows"] if "bench_darwin_perplexity" in r]
    if darwin:
        lines += ["", "darwin rows: the genomes of results/bench_darwin.json rebuilt here; its perplexities were "
                  + ", ".join(f"{r['bench_darwin_perplexity']:.2f} ({r['name']})" for r in darwin) + "."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default=OFFLINE_TASK)
    ap.add_argument("--rows", default=",".join([*ROWS, *DARWIN]))
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--redo", action="store_true")
    common_options(ap, "bench_zeroshot", runs=False)
    args = ap.parse_args()
    out = Path(args.out)
    path = out.with_suffix(".json")
    import lm_eval
    settings = dict(seed=args.seed, chunks=args.chunks, tasks=args.tasks.split(","), limit=args.limit,
                    threads=torch.get_num_threads(), torch=torch.__version__, machine=platform.machine(),
                    lm_eval=lm_eval.__version__)
    data = json.loads(path.read_text()) if path.is_file() else dict(rows=[])
    if args.report_only:
        return report(data, out)
    if data.get("settings", settings) | {"threads": 0} != settings | {"threads": 0} or args.redo:
        data = dict(rows=[])    # other settings: the old rows do not compare
    data["settings"] = settings
    model, tok = load_model(None)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    samples = calibration_for(tok, nsamples=32, seqlen=512, seed=args.seed, data_dir=args.data_dir)[0]
    chunks = eval_data_for(tok, seqlen=512, chunks=args.chunks, data_dir=args.data_dir).chunks
    for name in args.rows.split(","):
        if any(r["name"] == name for r in data["rows"]):
            continue
        row = measure(model, dense, tok, name, samples, chunks, settings["tasks"], args.limit, args.data_dir)
        data["rows"] = [r for r in data["rows"] if r["name"] != name] + [row]
        data["rows"].sort(key=lambda r: [*ROWS, *DARWIN].index(r["name"]))
        print(row, flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))
    report(data, out)


if __name__ == "__main__":
    main()
