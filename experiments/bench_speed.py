"""Speed of the loops every run goes through, old and new paths side by side (issue 16).

    PRUNERZERO_DATA_DIR=../shared/data python experiments/bench_speed.py [--threads 2] [--repeats 3]

Each part times its variants alternately in one process (variant A, B, C, then A, B, C again,
--repeats times) and keeps the median, since these machines are noisy; ratios are to the first
variant of the part. On the bundled SmolLM2-135M:

  limit        fp32, bf16 and fp16 matrix products of a decoder block's shapes (512 tokens):
               the GFLOP/s this machine can give, the ceiling of every loop below
  evaluation   perplexity on --chunks WikiText-2 chunks of 512: the published code's loop
               (batch 1, fp32, whole logits upcast, one cross-entropy), prunerzero's fp32
               path at batch 1 and 4 (fp32 NLL 1,024 tokens at a time), and the model held in bf16
               (which on a CPU without bf16 units runs block by block in fp32, see blocks.py);
               tokens/s, the perplexity, and the share of the fp32 limit
  block        one decoder block on 16 calibration samples, 1, 4 and 16 samples per call
               (what sequential pruning, X, H and SparseGPT's Hessians do 2 x 30 times)
  gradients    G on --g-samples calibration samples: one backward per sample (the published
               definition) against batched backward with per-sample products in hooks, and
               the largest relative difference between the two
  sweep        SparseGPT's OBS sweep (50% unstructured, blocks of 128) on one layer of the
               bundled model's MLP shape and of LLaMA-2-7B's attention and MLP shapes (random
               weights, H from 2,048 random correlated inputs): the published one-level loop
               (each column's error subtracted from the rest of its block at once) against
               the two-level sweep of engine/reconstruct.py; the share of weights whose
               pruned/kept state differs, and the largest weight difference

--parts runs some of these and keeps the others' figures from the last JSON.

Writes results/bench_speed.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import common_options
from prunerzero.engine.blocks import block_inputs
from prunerzero.engine.passes import run_block
from prunerzero.engine.calibration import compute_g
from prunerzero.engine.evaluate import perplexity
from prunerzero.engine.masks import layer_mask
from prunerzero.engine.models import decoder_layers, default_model_path
from prunerzero.loading import load_model
from prunerzero.pipeline import calibration_for, eval_data_for


def alternate(variants: dict, repeats: int) -> dict:
    """{name: (median seconds, last result)} of callables timed in turn, `repeats` rounds."""
    times = {name: [] for name in variants}
    results = {}
    for _ in range(repeats):
        for name, fn in variants.items():
            t = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t)
    return {name: (statistics.median(ts), results[name]) for name, ts in times.items()}


def matmul_limit(repeats: int) -> dict:
    """GFLOP/s of (512 x 576) @ (576 x 1536) products, the MLP's shape, per dtype."""
    def product(dtype):
        a, b = torch.randn(512, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
        F.linear(a, b)
        return lambda: [F.linear(a, b) for _ in range(20)]
    flops = 20 * 2 * 512 * 576 * 1536
    timed = alternate({str(d).split(".")[-1]: product(d) for d in (torch.float32, torch.bfloat16, torch.float16)},
                      repeats)
    return {name: flops / s / 1e9 for name, (s, _) in timed.items()}


@torch.inference_mode()
def reference_nll(model, chunks) -> float:
    """The published evaluation loop: one chunk at a time, the whole logits in fp32, shifted,
    one cross-entropy (mean) per chunk times its token count."""
    total = 0.0
    for c in chunks:
        logits = model(c[None]).logits.float()
        loss = F.cross_entropy(logits[0, :-1], c[1:])
        total += float(loss) * (len(c) - 1)
    return math.exp(total / (len(chunks) * (chunks.shape[1] - 1)))


def flops_per_token(model) -> float:
    """2 x the weights each token multiplies (blocks and head), plus attention's 2 x 2 x
    layers x hidden x (context/2) at half the chunk length on average."""
    cfg = model.config
    weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    weights += 0 if any("lm_head" in n for n, _ in model.named_parameters()) else model.lm_head.weight.numel()
    return 2 * weights + 2 * 2 * cfg.num_hidden_layers * cfg.hidden_size * 256


def evaluation(model_path, chunks, repeats, limit_fp32):
    fp32, _ = load_model(model_path, dtype="fp32")
    bf16, _ = load_model(model_path, dtype="bf16")
    timed = alternate({
        "published loop (batch 1, fp32)": lambda: reference_nll(fp32, chunks),
        "prunerzero fp32 (batch 1)": lambda: perplexity(fp32, chunks, batch_size=1, progress=False),
        "prunerzero fp32 (batch 4)": lambda: perplexity(fp32, chunks, batch_size=4, progress=False),
        "prunerzero bf16 weights": lambda: perplexity(bf16, chunks, progress=False),
    }, repeats)
    tokens, per_token = chunks.numel(), flops_per_token(fp32)
    return [{"variant": name, "s": s, "tokens_per_s": tokens / s, "perplexity": ppl,
             "share_of_fp32_limit": tokens / s * per_token / 1e9 / limit_fp32}
            for name, (s, ppl) in timed.items()], per_token


def block_calls(model, samples, repeats):
    inputs, calls = block_inputs(model, samples)
    block = decoder_layers(model)[3]
    with torch.inference_mode():
        timed = alternate({f"{b} per call": (lambda b=b: run_block(block, inputs, calls[3], batch=b))
                           for b in (1, 4, 16)}, repeats)
    one = timed["1 per call"][1]
    return [{"variant": name, "s": s, "samples": len(samples),
             "max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(out, one))}
            for name, (s, out) in timed.items()]


def gradients(model, samples, repeats):
    timed = alternate({"per sample (batch 1)": lambda: compute_g(model, samples, batch=1),
                       "batched (batch 4)": lambda: compute_g(model, samples, batch=4)}, repeats)
    ref = timed["per sample (batch 1)"][1]
    rows = []
    for name, (s, g) in timed.items():
        rel = max(float((g[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)
        rows.append({"variant": name, "s": s, "samples": len(samples), "max_rel_diff": rel})
    return rows


PARTS = ("limit", "evaluation", "block", "gradients", "sweep")
SWEEP_SHAPES = [(1536, 576), (4096, 4096), (11008, 4096)]


@torch.no_grad()
def published_sweep(W, U, sparsity=0.5, blocksize=128):
    """SparseGPT's sweep as its authors' loop runs it: per column, one rank-1 update of the
    whole rest of the block; the block's mask chosen over all rows at its start."""
    W = W.clone()
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = U1.diagonal()
        s = W1 * W1 / (d * d)
        mask = layer_mask(s, sparsity)  # the chooser both variants share
        err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            e = torch.where(mask[:, i], W1[:, i], 0) / d[i]
            W1[:, i:] -= torch.outer(e, U1[i, i:])
            W1[mask[:, i], i] = 0
            err[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return W


def sweeps(repeats):
    from prunerzero.engine.reconstruct import inverse_factor
    from prunerzero.engine.sparsegpt import sparsegpt_weights
    g = torch.Generator().manual_seed(0)
    rows_out = []
    for rows, cols in SWEEP_SHAPES:
        X = torch.randn(2048, cols, generator=g) @ (torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols)
        U, dead = inverse_factor(X.T @ X)
        W = torch.randn(rows, cols, generator=g)
        timed = alternate({"published loop": lambda: published_sweep(W, U),
                           "two-level sweep": lambda: sparsegpt_weights(W, U, dead, 0.5)}, repeats)
        ref = timed["published loop"][1]
        for name, (sec, out) in timed.items():
            rows_out.append({"shape": f"{rows} x {cols}", "variant": name, "s": sec,
                             "mask_differs": float(((out == 0) != (ref == 0)).float().mean()),
                             "max_abs_diff": float((out - ref).abs().max())})
    return rows_out


def report(data, out: Path):
    s = data["settings"]
    lim = data["limit_gflops"]
    lines = [f"# Loop speed on {s['machine']} ({s['threads']} threads, torch {s['torch']})", "",
             f"Median of {s['repeats']} alternating rounds; ratio = first variant's time / this one's.", "",
             "| matrix product (512 x 576 x 1536) | GFLOP/s |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in lim.items()]
    first = data["evaluation"][0]["s"]
    lines += ["", f"Evaluation, {s['chunks']} WikiText-2 chunks of 512 "
              f"({data['flops_per_token'] / 1e9:.2f} GFLOP/token):", "",
              "| variant | tok/s | speed-up | perplexity | share of fp32 limit |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['tokens_per_s']:.0f} | {first / r['s']:.2f}x | {r['perplexity']:.3f} | "
              f"{r['share_of_fp32_limit']:.0%} |" for r in data["evaluation"]]
    first = data["block"][0]["s"]
    lines += ["", "One decoder block, 16 calibration samples of 512:", "",
              "| samples per call | s | speed-up | max abs diff |", "|---|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['s']:.2f} | {first / r['s']:.2f}x | {r['max_abs_diff']:.1e} |"
              for r in data["block"]]
    first = data["gradients"][0]["s"]
    lines += ["", f"G on {data['gradients'][0]['samples']} calibration samples of 512:", "",
              "| variant | s | speed-up | max rel diff |", "|---|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['s']:.1f} | {first / r['s']:.2f}x | {r['max_rel_diff']:.1e} |"
              for r in data["gradients"]]
    if "sweep" in data:
        lines += ["", "SparseGPT's OBS sweep, one layer, 50% unstructured:", "",
                  "| layer (out x in) | variant | s | speed-up | share of weights whose mask differs | max abs diff |",
                  "|---|---|---:|---:|---:|---:|"]
        first = {}
        for r in data["sweep"]:
            first.setdefault(r["shape"], r["s"])
            lines.append(f"| {r['shape']} | {r['variant']} | {r['s']:.2f} | {first[r['shape']] / r['s']:.2f}x | "
                         f"{r['mask_differs']:.1e} | {r['max_abs_diff']:.1e} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_options(ap, "bench_speed", runs=False)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--g-samples", type=int, default=4)
    ap.add_argument("--parts", default=",".join(PARTS), help="any of " + ",".join(PARTS))
    args = ap.parse_args()
    parts = args.parts.split(",")
    out = Path(args.out)
    if args.report_only:
        return report(json.loads(out.with_suffix(".json").read_text()), out)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    path = default_model_path()
    old = out.with_suffix(".json")
    data = json.loads(old.read_text()) if old.is_file() and set(parts) != set(PARTS) else {}
    data["settings"] = {"threads": args.threads, "repeats": args.repeats, "chunks": args.chunks,
                        "seed": args.seed, "torch": torch.__version__, "machine": platform.machine(),
                        "model": str(path)}
    if "limit" in parts:
        data["limit_gflops"] = matmul_limit(args.repeats)
    if "sweep" in parts:
        data["sweep"] = sweeps(args.repeats)
    if {"evaluation", "block", "gradients"} & set(parts):
        model, tok = load_model(path, dtype="fp32")
        samples = calibration_for(tok, nsamples=16, seqlen=512, seed=args.seed, data_dir=args.data_dir)[0]
    if "evaluation" in parts:
        chunks = eval_data_for(tok, seqlen=512, chunks=args.chunks, data_dir=args.data_dir).chunks
        data["evaluation"], data["flops_per_token"] = evaluation(path, chunks, args.repeats,
                                                                 data["limit_gflops"]["float32"])
    if "block" in parts:
        data["block"] = block_calls(model, samples, args.repeats)
    if "gradients" in parts:
        data["gradients"] = gradients(model, samples[:args.g_samples], args.repeats)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    report(data, out)


if __name__ == "__main__":
    main()
