"""What stopping the recording pass at a block's last layer saves: sequential prunes of the
default model timed with the stop and with the pass run whole (blocks.last_layer patched to
stop nowhere), alternated in one process so the ratio is fair on a noisy machine.

    python experiments/bench_recording_stop.py [--nsamples 8] [--repeats 3] [--methods sparsegpt,wanda]

Also checks that both give the same perplexity (the same statistics). Writes
results/bench_recording_stop.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from common import RESULTS
from prunerzero import apply_metric, apply_sparsegpt, perplexity
from prunerzero.engine import blocks
from prunerzero.loading import load_model
from prunerzero.pipeline import calibration_for, eval_data_for


def prune_once(method: str, samples, whole: bool):
    """(seconds, model) of one sequential prune of a fresh default model."""
    model, _ = load_model(None, tokenizer=False)
    saved = blocks.last_layer
    if whole:
        blocks.last_layer = lambda *a, **k: []
    try:
        t0 = time.perf_counter()
        if method == "sparsegpt":
            apply_sparsegpt(model, 0.5, calibration=samples, progress=False)
        else:
            apply_metric(model, method, 0.5, calibration=samples, progress=False)
        return time.perf_counter() - t0, model
    finally:
        blocks.last_layer = saved


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="sparsegpt,wanda")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(RESULTS / "bench_recording_stop"))
    args = ap.parse_args()
    _, tok = load_model(None)
    samples, ids, starts = calibration_for(tok, "wikipedia", args.nsamples, 512, 0, args.data_dir)
    chunks = eval_data_for(tok, None, 512, args.chunks, args.data_dir, "wikipedia", ids, starts).chunks
    rows = {}
    for method in args.methods.split(","):
        times, ppl = {False: [], True: []}, {}
        for _ in range(args.repeats):
            for whole in (False, True):
                seconds, model = prune_once(method, samples, whole)
                times[whole].append(seconds)
                ppl.setdefault(whole, perplexity(model, chunks, progress=False))
        rows[method] = dict(stopped_s=times[False], whole_s=times[True],
                            ratio=statistics.median(times[False]) / statistics.median(times[True]),
                            stopped_ppl=ppl[False], whole_ppl=ppl[True])
        print(method, rows[method], flush=True)
    settings = dict(nsamples=args.nsamples, repeats=args.repeats, chunks=args.chunks, threads=torch.get_num_threads(),
                    cpu=platform.processor() or platform.machine(), torch=torch.__version__)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(dict(settings=settings, rows=rows), indent=1))
    lines = ["# The recording pass stopped at the block's last layer", "",
             f"Sequential prunes of SmolLM2-135M at 50%, {args.nsamples} x 512 calibration tokens, alternated in one "
             f"process, {args.repeats} of each; {settings['threads']} threads, {settings['cpu']}, torch "
             f"{settings['torch']}. Perplexity: WikiText-2 {args.chunks} x 512.", "",
             "| method | stopped, s (median) | whole pass, s (median) | ratio | perplexity, stopped | whole |",
             "|---|---:|---:|---:|---:|---:|"]
    for m, r in rows.items():
        lines.append(f"| {m} | {statistics.median(r['stopped_s']):.1f} | {statistics.median(r['whole_s']):.1f} | "
                     f"{r['ratio']:.3f} | {r['stopped_ppl']:.3f} | {r['whole_ppl']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
