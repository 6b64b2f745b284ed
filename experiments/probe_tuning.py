"""Block tuning on one block of the default model, before a full prune: block BLOCK's layers
pruned by the recipe (from its dense inputs, as one-shot pruning would), then tuned towards
the dense block's outputs with each learning rate and epoch count, the block's relative
output error measured on the calibration windows and on held-out Wikipedia windows (what
tuning generalises), with the seconds each tuning took.

    python experiments/probe_tuning.py [--block 10] [--lrs 1e-6,3e-6,1e-5,3e-5,1e-4] [--epochs 1,2]
        [--windows 0,4,8]   (tune on the first K calibration windows; 0: all)
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from common import RESULTS
from prunerzero.data import NO_BOS
from prunerzero.engine.blocks import block_inputs
from prunerzero.engine.calibration import Hessians
from prunerzero.engine.layers import matrix
from prunerzero.engine.models import decoder_layers, prunable_linears
from prunerzero.engine.passes import feed, run_block
from prunerzero.engine.prune import _prune_block_layers
from prunerzero.engine.reconstruct import Update
from prunerzero.engine.tuning import relative_error, tune_block
from prunerzero.language.metric import Metric
from prunerzero.loading import load_model
from prunerzero.pipeline import WIKIPEDIA_HELDOUT, calibration_for, eval_data_for


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--metric", default="sqr(W)*X")
    ap.add_argument("--update", default="admm percdamp=0.3")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--lrs", default="1e-6,3e-6,1e-5,3e-5,1e-4")
    ap.add_argument("--epochs", default="1,2")
    ap.add_argument("--windows", default="0", help="tune on the first K calibration windows (0: all), a list")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "probe_tuning"))
    a = ap.parse_args()
    model, tok = load_model(None)
    cal, ids, starts = calibration_for(tok, "wikipedia", a.nsamples, 512, a.seed)
    held = eval_data_for(tok, WIKIPEDIA_HELDOUT, 512, a.heldout, None, "wikipedia", ids, starts, NO_BOS).chunks
    x_cal, calls = block_inputs(model, cal)
    x_held, _ = block_inputs(model, held)
    blocks = decoder_layers(model)
    with torch.no_grad():
        for b in range(a.block):
            x_cal, x_held = run_block(blocks[b], x_cal, calls[b]), run_block(blocks[b], x_held, calls[b])
        block, call = blocks[a.block], calls[a.block]
        y_cal, y_held = run_block(block, x_cal, call), run_block(block, x_held, call)
    linears = prunable_linears(block)
    m = Metric.parse(a.metric)
    with torch.no_grad(), Hessians(linears) as rec:
        feed(block, x_cal, call)
    _prune_block_layers(f"layers.{a.block}.", linears, rec, m.compile(), m.terminals, None, len(cal), a.sparsity,
                        "unstructured", m.group, Update.parse(a.update))
    pruned = {n: matrix(lin).clone() for n, lin in linears.items()}
    rows = [dict(windows=0, lr=0.0, epochs=0, seconds=0.0, calibration=relative_error(block, x_cal, y_cal, call, 1),
                 heldout=relative_error(block, x_held, y_held, call, 1))]
    print(rows[0], flush=True)
    for windows in [int(k) or len(x_cal) for k in a.windows.split(",")]:
        for epochs in [int(e) for e in a.epochs.split(",")]:
            for lr in [float(v) for v in a.lrs.split(",")]:
                for n, lin in linears.items():
                    matrix(lin).copy_(pruned[n])
                t0 = time.perf_counter()
                tune_block(block, linears, x_cal[:windows], y_cal[:windows], call, epochs, lr)
                rows.append(dict(windows=windows, lr=lr, epochs=epochs, seconds=time.perf_counter() - t0,
                                 calibration=relative_error(block, x_cal, y_cal, call, 1),
                                 heldout=relative_error(block, x_held, y_held, call, 1)))
                print(rows[-1], flush=True)
    settings = dict(vars(a), threads=torch.get_num_threads(), processor=platform.processor(), torch=torch.__version__)
    with open(a.out + ".json", "w") as f:
        json.dump(dict(settings=settings, rows=rows), f, indent=1)
    lines = [f"# Block tuning on block {a.block} ({a.metric} + {a.update}, {a.sparsity:.0%})", "",
             f"Calibration {a.nsamples} x 512 Wikipedia tokens (seed {a.seed}), held-out Wikipedia {a.heldout} x 512; "
             f"{settings['threads']} threads, torch {settings['torch']}. Relative output error of the block "
             "against the dense block's outputs (mean square of the difference over that of the outputs).", "",
             "| windows tuned on | epochs | learning rate | calibration | held out | tuning s |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['windows']} | {r['epochs']} | {r['lr']:g} | {r['calibration']:.5f} | {r['heldout']:.5f} | {r['seconds']:.1f} |"
              for r in rows]
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
