"""Compile + score time of metrics over every prunable layer shape of SmolLM2-135M.

    python experiments/bench_metric_compile.py [--repeats 3] [--device cpu]

Random W, G, X of the 210 prunable Linear shapes (taken from a meta-device model built
from SmolLM2-135M's config, so no weights are needed). For each metric: the one-off
compile time (parse, OOS, canonical key, code generation; cache cleared first) and the
time to score all 210 layers, beside a naive operator-by-operator evaluation of the
unsimplified tree, in the same run. Writes results/bench_metric_compile.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prunerzero import Metric
from prunerzero.language.compile import compile_cached, interpret
from prunerzero.language.text import parse

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
METRICS = ["magnitude", "wanda", "ria", "gblm", "pruner-zero",
           "exp(log(sqrt(sqr(W))))*X", "div(mul(sqr(W), mms(G)), zsn(add(X, sqrt(G))))"]


def layer_shapes() -> list[tuple[int, int]]:
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    return [tuple(m.weight.shape) for name, m in model.model.layers.named_modules()
            if isinstance(m, torch.nn.Linear)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_metric_compile"))
    args = ap.parse_args()
    torch.manual_seed(0)
    shapes = layer_shapes()
    layers = [dict(W=torch.randn(s, device=args.device) * 0.05, G=torch.rand(s, device=args.device) * 1e-3,
                   X=torch.rand(1, s[1], device=args.device) * 10, N=32) for s in shapes]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rows = []
    for text in METRICS:
        compile_cached.cache_clear()
        t0 = time.perf_counter()
        m = Metric.parse(text)
        key = m.canonical()
        fn = m.compile()
        t_compile = time.perf_counter() - t0
        tree = parse(m.text)
        compiled, interpreted = [], []
        for _ in range(args.repeats):
            sync(); t0 = time.perf_counter()
            for p in layers:
                fn(**p)
            sync(); compiled.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for p in layers:
                interpret(tree, p)
            sync(); interpreted.append(time.perf_counter() - t0)
        rows.append(dict(metric=text, simplified=str(m.simplify()), canonical=key,
                         compile_ms=1e3 * t_compile, score_210_layers_ms=1e3 * statistics.median(compiled),
                         naive_tree_ms=1e3 * statistics.median(interpreted)))
        r = rows[-1]
        print(f"{text:48} compile {r['compile_ms']:7.1f} ms  score {r['score_210_layers_ms']:7.1f} ms  "
              f"naive tree {r['naive_tree_ms']:7.1f} ms  ({r['naive_tree_ms'] / r['score_210_layers_ms']:.2f}x)")
    settings = dict(layers=len(shapes), weights=sum(a * b for a, b in shapes), repeats=args.repeats,
                    device=args.device, torch=torch.__version__, threads=torch.get_num_threads(),
                    machine=platform.machine(), processor=platform.processor() or platform.platform())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(dict(settings=settings, results=rows), indent=2))
    lines = [f"# Metric compile + score, {settings['layers']} SmolLM2-135M layer shapes "
             f"({settings['weights'] / 1e6:.1f}M weights), {args.device}, {settings['threads']} threads, "
             f"median of {args.repeats}", "",
             "| metric | simplified | compile ms | score 210 layers ms | naive tree ms |", "|---|---|---:|---:|---:|"]
    lines += [f"| `{r['metric']}` | `{r['simplified']}` | {r['compile_ms']:.1f} | {r['score_210_layers_ms']:.1f} | "
              f"{r['naive_tree_ms']:.1f} |" for r in rows]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
