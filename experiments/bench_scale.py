"""Memory and time of pruning models far larger than the bundled one.

    python experiments/bench_scale.py --shape 7b [--phases wanda,sparsegpt,admm,search] [--device cpu]
    python experiments/bench_scale.py --shape 7b --layers 2 --phases sparsegpt,admm --nsamples 8

--layers N keeps the shape's layers as they are but only N of them: the time of each method per
layer of that shape, where the whole model would take hours on a CPU (every decoder layer of a
shape costs the same, so the whole model's time is about the per-layer time times its layers).

Builds a random-weight LLaMA-architecture model of the given shape once (seeded, saved in
--dtype as safetensors under --runs, with the bundled SmolLM2 tokenizer, so its vocabulary is
SmolLM2's 49,152 tokens and real calibration and evaluation text can be fed to it), then runs
each phase in a fresh process and records its wall time and peak resident memory (and, with
--device cuda, peak device memory per phase):

  wanda      load, `apply_metric(wanda)` sequential at 50% with --nsamples x 512 Wikipedia
             calibration tokens, perplexity on --chunks WikiText-2 chunks of 512;
  sparsegpt  the same with `apply_sparsegpt`;
  admm       the same with --recipe (a catalog recipe, default the README's recommended one, or
             METRIC@UPDATE);
  search     one search evaluation: X of the dense model cached to disk, then one candidate
             (Wanda's metric) evaluated by the search's Evaluator, as a worker would.

Random weights give meaningless perplexities (about the vocabulary size); the figures that
matter are memory and time against the model's size. Writes results/bench_scale.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import common_options

SHAPES = {  # LLaMA-family shapes: TinyLlama-1.1B and LLaMA-2-7B (vocabulary: the tokenizer's)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
}
PHASES = ("wanda", "sparsegpt", "admm", "search")
RECOMMENDED = "sqrtx-admm-refined"   # the README's recommended recipe within 1.2x SparseGPT's time


def build(folder: Path, shape: str, dtype: str, seed: int, layers: int | None = None) -> Path:
    """The random model's folder, built on first use (atomically: a half-written one is rebuilt)."""
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from prunerzero.engine.models import default_model_path, resolve_dtype
    tok = AutoTokenizer.from_pretrained(default_model_path())
    dims = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, **dims)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = LlamaForCausalLM._from_config(config, dtype=resolve_dtype(dtype))
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp, max_shard_size="2GB")
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    print(f"built {shape} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, {dtype}) "
          f"in {time.perf_counter() - t0:.0f} s at {folder}", flush=True)
    return folder


def phase(name: str, folder: str, dtype: str, device: str, nsamples: int, chunks: int, seed: int,
          recipe: str = "") -> dict:
    """One phase in this process; its figures as a dict."""
    from prunerzero import apply_metric, apply_sparsegpt, perplexity
    from prunerzero.loading import load_model
    from prunerzero.pipeline import calibration_for, eval_data_for
    cuda = device.startswith("cuda")
    t0 = time.perf_counter()
    model, tok = load_model(folder, dtype=dtype, device=device)
    out = dict(phase=name, load_s=time.perf_counter() - t0, rss_after_load_gib=_rss_gib(),
               parameters=sum(p.numel() for p in model.parameters()),
               model_gib=sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30)
    samples = calibration_for(tok, "wikipedia", nsamples, 512, seed)[0]
    ev = eval_data_for(tok, None, 512, chunks)
    t1 = time.perf_counter()
    if name == "wanda":
        apply_metric(model, "wanda", 0.5, calibration=samples, progress=False)
    elif name == "sparsegpt":
        apply_sparsegpt(model, 0.5, calibration=samples, progress=False)
    elif name == "admm":
        metric, _, update = recipe.partition("@")      # a catalog name, or METRIC@UPDATE
        report = apply_metric(model, metric, 0.5, calibration=samples, update=update or None, progress=False)
        out.update(recipe=recipe, update=report.update)
    else:
        out.update(_search_evaluation(model, folder, samples, ev.chunks, dtype, device))
    out["work_s"] = time.perf_counter() - t1
    if name != "search":
        t2 = time.perf_counter()
        out["perplexity"] = perplexity(model, ev.chunks, progress=False)
        out["eval_s"] = time.perf_counter() - t2
    out["peak_rss_gib"] = _rss_gib()
    if cuda:
        out["peak_device_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def _search_evaluation(model, folder, samples, chunks, dtype, device) -> dict:
    """X cached as `evolve` caches it, then one Evaluator task on the loaded model."""
    from prunerzero.engine.calibration import cache_path, cached, compute_x
    from prunerzero.search.evaluator import Evaluator, Setup, Task
    settings = dict(model=str(folder), nsamples=len(samples), seed=0, dtype=dtype, bench="scale")
    t0 = time.perf_counter()
    cached("X", settings, lambda: compute_x(model, samples))
    x_s = time.perf_counter() - t0
    setup = Setup(model=str(folder), primitives={"X": str(cache_path("X", settings))}, nsamples=len(samples),
                  sparsity=0.5, structure="unstructured", chunks={"search": chunks}, dtype=dtype, device=device)
    ev = Evaluator(setup, model=model)
    r = ev(Task("W*X", 0, len(chunks)))
    if r.error:
        raise RuntimeError(r.error)
    return dict(x_s=x_s, candidate_s=r.seconds, perplexity=r.perplexity)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def report(data, out: Path):
    s = data["settings"]
    lines = [f"# Pruning at scale: random-weight LLaMA shapes on {s['device']} ({s['threads']} threads, "
             f"{s['machine']}, {s['ram_gib']:.0f} GiB RAM, torch {s['torch']})", "",
             "Sequential 50% unstructured, calibration `calib` x 512 Wikipedia tokens; perplexity on `chunks` "
             "WikiText-2 chunks of 512 (random weights: only memory and time mean anything). Peak RSS: the "
             "phase's process, from its start (load included). search: X cached, then one candidate (W*X) "
             "evaluated as a search worker does.", "",
             "| shape | layers | dtype | params (B) | model GiB | calib | chunks | phase | load s | work s | "
             "work s / layer | x SparseGPT | eval s | peak RSS GiB | peak device GiB |",
             "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        dev = f"{r['peak_device_gib']:.1f}" if "peak_device_gib" in r else "not measured"
        layers = r.get("layers") or SHAPES[r["shape"]]["num_hidden_layers"]
        work, base = r["work_s"], _sparsegpt_row(data["rows"], r)
        ratio = f"{work / base['work_s']:.2f}" if base and r["phase"] != "search" else ""
        name = f"{r['phase']} ({r['recipe']})" if r.get("recipe") else r["phase"]
        lines.append(f"| {r['shape']} | {layers} | {r['dtype']} | {r['parameters'] / 1e9:.2f} | {r['model_gib']:.1f} | "
                     f"{r.get('nsamples', 8)} | {r.get('chunks', 4)} | {name} | {r['load_s']:.0f} | {work:.0f} | "
                     f"{work / layers:.1f} | {ratio} | {r.get('eval_s', 0):.0f} | {r['peak_rss_gib']:.1f} | {dev} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _sparsegpt_row(rows, r):
    """SparseGPT's row on the same model, dtype and device as r (None if not measured)."""
    same = ("shape", "dtype", "device", "layers", "nsamples")
    return next((b for b in rows if b["phase"] == "sparsegpt" and all(b.get(k) == r.get(k) for k in same)), None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--layers", type=int, default=None, help="only this many of the shape's decoder layers")
    ap.add_argument("--recipe", default=RECOMMENDED,
                    help="the admm phase's recipe: a catalog name, or METRIC@UPDATE (\"sqr(W)*X@admm bf16=1\")")
    ap.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    common_options(ap, "bench_scale")
    args = ap.parse_args()
    folder = Path(args.runs) / f"llama-{args.shape}-{args.dtype}{f'-L{args.layers}' if args.layers else ''}"
    if args.phase:
        print("RESULT " + json.dumps(phase(args.phase, str(folder), args.dtype, args.device, args.nsamples,
                                           args.chunks, args.seed, args.recipe)))
        return
    out = Path(args.out)
    path = out.with_suffix(".json")
    data = json.loads(path.read_text()) if path.is_file() else dict(rows=[])
    if args.report_only:
        return report(data, out)
    build(folder, args.shape, args.dtype, args.seed, args.layers)
    data["settings"] = dict(device=args.device, threads=torch.get_num_threads(), machine=platform.machine(),
                            ram_gib=_ram_gib(), torch=torch.__version__, seed=args.seed)
    for name in args.phases.split(","):
        cmd = [sys.executable, __file__, "--phase", name, "--shape", args.shape, "--dtype", args.dtype,
               "--device", args.device, "--nsamples", str(args.nsamples), "--chunks", str(args.chunks),
               "--runs", args.runs, "--seed", str(args.seed), "--recipe", args.recipe]
        cmd += ["--layers", str(args.layers)] if args.layers else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not result:
            print(f"{name}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            continue
        row = dict(json.loads(result[-1][7:]), shape=args.shape, dtype=args.dtype, device=args.device,
                   nsamples=args.nsamples, chunks=args.chunks, layers=args.layers)
        recipe = args.recipe if name == "admm" else None
        key = (args.shape, args.dtype, name, args.device, args.layers, recipe)
        data["rows"] = [r for r in data["rows"] if (r["shape"], r["dtype"], r["phase"], r["device"], r.get("layers"),
                                                    r.get("recipe")) != key] + [row]
        print(row, flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))
    report(data, out)


def _ram_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2 ** 20


if __name__ == "__main__":
    main()
