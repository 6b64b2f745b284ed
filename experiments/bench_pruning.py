"""Pruning methods on the default model: perplexity, measured sparsity and prune time.

    python experiments/bench_pruning.py [--parts table,sweeps,full] [--chunks 64]

Parts (each result is saved as soon as it is measured; a rerun skips what is done):
  table   dense, magnitude, wanda (sequential and one-shot), ria, gblm, pruner-zero,
          SparseGPT and the recipes wanda+obs, wanda+obs-adaptive, wanda+admm (Wanda's mask, then
          reconstruction of the kept weights) at 50% unstructured, 2:4 and 4:8, on the first
          --chunks chunks;
  sweeps  wanda and pruner-zero at sparsity 0.1 ... 0.7, and with 4 ... 64 calibration
          samples at 50% (Pruner-Zero's Figure 3);
  allocation  wanda and wanda+admm with uniform, OWL and searched per-layer sparsity at 60% and 70%
          (the search: --allocation-generations generations, 8 offspring, KL on 2 then 8 calibration
          windows; its run folders in experiments/runs/bench_pruning, reused by a rerun);
  full    the 50% unstructured row of the table on the whole WikiText-2 test split;
  times   prune every table row again, without evaluating, and keep that prune time: run this
          part alone on a quiet machine (the other parts may share the CPU with other work).

Calibration: --nsamples x --seqlen tokens of `wikipedia` (Wanda's sampler, --seed). Prune
time covers the pruning call (calibration forward passes, statistics, masks, weight updates);
G, which gblm, pruner-zero and the evolved metric need, is computed once per calibration set from the dense model
and its time is reported on its own. Writes results/bench_pruning.{json,md} and
results/bench_pruning_sweeps.png.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from common import HERE, common_options
from prunerzero import apply_metric, apply_sparsegpt, perplexity
from prunerzero.search.allocation import AllocationSearchConfig
from prunerzero.engine.calibration import cache_path, cached, compute_g
from prunerzero.language.metric import Metric
from prunerzero.loading import load_model
from prunerzero.pipeline import calibration_for, eval_data_for, primitive_settings

METHODS = ["magnitude", "wanda", "wanda (one-shot)", "ria", "gblm", "pruner-zero", "sparsegpt", "evolved-smollm2-50",
           "evolved-smollm2-2of4", "wanda+obs", "wanda+obs-adaptive", "wanda+admm"]  # metric+update: a recipe
PATTERNS = [("unstructured", 0.5), ("2:4", 0.5), ("4:8", 0.5)]
SWEEP_SPARSITY = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
# per-layer allocation at high sparsity: metric[+update][@allocation]
ALLOCATION_METHODS = ["wanda", "wanda@owl", "wanda@search", "wanda+admm", "wanda+admm@owl", "wanda+admm@search"]
# --allocation search in this benchmark: (train tokens, eval tokens, survivors) per stage, and the
# run folders (one per metric and sparsity: a recipe with an update reuses its metric's search)
ALLOCATION_STAGES = ((0, 1024, 2), (0, 4096, 1))
RUNS = HERE / "runs" / "bench_pruning"
ALLOCATION_SPARSITY = [0.6, 0.7]
SWEEP_NSAMPLES = [4, 8, 16, 32, 64]
# WT2-512x64 perplexity of the published code (locuslab/wanda, pprp/Pruner-Zero) on the default
# model with the same calibration draws, from ../shared/REFERENCE.md: the bar these rows must meet.
PUBLISHED = {("dense", "unstructured"): 29.935,
             ("magnitude", "unstructured"): 515.908, ("wanda", "unstructured"): 67.207,
             ("sparsegpt", "unstructured"): 61.965, ("pruner-zero", "unstructured"): 77.160,
             ("magnitude", "2:4"): 1631.300, ("wanda", "2:4"): 207.715, ("sparsegpt", "2:4"): 118.788,
             ("pruner-zero", "2:4"): 256.572, ("magnitude", "4:8"): 857.345, ("wanda", "4:8"): 109.227,
             ("sparsegpt", "4:8"): 84.524, ("pruner-zero", "4:8"): 129.765}


def row_key(method, structure, sparsity, nsamples, chunks) -> str:
    """A result's key in bench_pruning.json; chunks is the chunk count or "full"."""
    return f"{method}|{structure}|{sparsity}|{nsamples}|{chunks}"


class Bench:
    def __init__(self, args):
        self.args = args
        self.path = Path(args.out + ".json")
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"results": {}}
        self.model, self.tok = load_model(args.model)
        self.dense = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.calib, self.grads = {}, {}
        self.eval = {}

    def chunks(self, full: bool):
        key = "full" if full else "first"
        if key not in self.eval:
            samples, ids, starts = self.calibration(self.args.nsamples)
            ev = eval_data_for(self.tok, None, self.args.seqlen, None if full else self.args.chunks,
                               self.args.data_dir, "wikipedia", ids, starts)
            if ev.note:
                print("NOTE: " + ev.note)
            self.eval[key] = ev
        return self.eval[key]

    def calibration(self, n):
        if n not in self.calib:
            self.calib[n] = calibration_for(self.tok, "wikipedia", n, self.args.seqlen, self.args.seed)
        return self.calib[n]

    def gradients(self, n):
        """G of calibration set n and the seconds it takes to compute; G comes from the shared
        primitive cache (where `apply` and `evolve` keep it) once its time has been measured here."""
        if n not in self.grads:
            self.restore()
            samples = self.calibration(n)[0]
            key = primitive_settings(self.args.model, "wikipedia", samples, self.args.seed, "fp32")
            timed = self.data.setdefault("gradients_s", {})
            if str(n) in timed and cache_path("G", key).is_file():
                self.grads[n] = (cached("G", key, None), timed[str(n)])
            else:
                t0 = time.perf_counter()
                g = compute_g(self.model, samples)
                timed[str(n)] = time.perf_counter() - t0
                cached("G", key, lambda: g)
                self.grads[n] = (g, timed[str(n)])
        return self.grads[n]

    def restore(self):
        self.model.load_state_dict(self.dense)

    def run(self, method, structure="unstructured", sparsity=0.5, nsamples=None, full=False):
        nsamples = nsamples or self.args.nsamples
        key = row_key(method, structure, sparsity, nsamples, "full" if full else self.args.chunks)
        if key in self.data["results"]:
            return self.data["results"][key]
        ev = self.chunks(full)
        row = dict(method=method, structure=structure, sparsity_target=sparsity, nsamples=nsamples,
                   eval=ev.source, eval_chunks=len(ev.chunks))
        self.restore()
        if method != "dense":
            row.update(self.prune(method, structure, sparsity, nsamples))
        t0 = time.perf_counter()
        row["perplexity"] = perplexity(self.model, ev.chunks)
        row["eval_s"] = time.perf_counter() - t0
        print(f"{key:48} ppl {row['perplexity']:10.3f}  sparsity {row.get('sparsity', 0):.4f}  "
              f"prune {row.get('prune_s', 0):6.1f} s", flush=True)
        self.data["results"][key] = row
        self.save()
        return row

    def retime_gradients(self):
        """Compute G of the table's calibration set again, alone, for its time."""
        n = str(self.args.nsamples)
        if n in self.data.get("gradients_alone", []):
            return
        self.data.get("gradients_s", {}).pop(n, None)
        self.grads.pop(self.args.nsamples, None)
        print(f"G of {n} samples {self.gradients(self.args.nsamples)[1]:6.1f} s", flush=True)
        self.data.setdefault("gradients_alone", []).append(n)
        self.save()

    def retime(self, method, structure, sparsity):
        """Prune a measured table row again and keep this prune time (and G's time)."""
        row = self.data["results"].get(row_key(method, structure, sparsity, self.args.nsamples, self.args.chunks))
        if row is None or row.get("timed_alone") or method == "dense":
            return
        self.restore()
        row.update(self.prune(method, structure, sparsity, self.args.nsamples), timed_alone=True)
        print(f"{method:20} {structure:12} prune {row['prune_s']:6.1f} s", flush=True)
        self.save()

    def prune(self, method, structure, sparsity, nsamples):
        samples = self.calibration(nsamples)[0]
        extra = {}
        if method == "sparsegpt":
            t0 = time.perf_counter()
            report = apply_sparsegpt(self.model, sparsity, structure, calibration=samples)
        else:
            recipe, _, allocation = method.replace(" (one-shot)", "").partition("@")
            metric, _, update = recipe.partition("+")
            sequential = "one-shot" not in method
            grads = None
            if "G" in Metric.parse(metric).terminals:  # G is computed once per calibration set
                grads, extra["gradients_s"] = self.gradients(nsamples)
                self.restore()
            if allocation == "search":
                allocation = AllocationSearchConfig(generations=self.args.allocation_generations, seed=self.args.seed,
                                                    stages=ALLOCATION_STAGES,
                                                    run=str(RUNS / f"allocation-{metric}-{sparsity}-{nsamples}"))
            t0 = time.perf_counter()
            report = apply_metric(self.model, metric, sparsity, structure, calibration=samples,
                                  sequential=sequential, grads=grads, update=update or "none",
                                  allocation=allocation or "uniform")
            if report.allocation["kind"] != "uniform":
                extra["allocation"] = {k: v for k, v in report.allocation.items() if k != "layer_sparsity"}
        return dict(prune_s=time.perf_counter() - t0, sparsity=report.sparsity, canonical=report.canonical,
                    sequential=report.sequential, **extra)

    def save(self):
        a = self.args
        self.data["settings"] = dict(model=a.model or "SmolLM2-135M-Instruct (bundled)", calibration="wikipedia",
                                     nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed, chunks=a.chunks,
                                     dtype="fp32", device="cpu", threads=torch.get_num_threads(),
                                     torch=torch.__version__, machine=platform.machine())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".partial")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


def report(data, out):
    rows = list(data["results"].values())
    s = data.get("settings", {})
    lines = [f"# Pruning methods on {s.get('model')}", "",
             f"Calibration {s.get('nsamples')} x {s.get('seqlen')} tokens of wikipedia, seed {s.get('seed')}; "
             f"{s.get('dtype')}, {s.get('device')}, {s.get('threads')} threads, torch {s.get('torch')}. "
             "Prune time: the pruning call (calibration passes, statistics, masks, updates); "
             "G (for metrics that use it) is computed once, its time shown apart. Times marked * were taken "
             "while the CPU was shared with other work (rerun with --parts times on a quiet machine). "
             "'published code': the same method run by its authors' code on the same calibration draws "
             "(../shared/REFERENCE.md); magnitude differs through tie-breaking on the model's 4-bit weight grid.", ""]
    table = [r for r in rows if r["nsamples"] == s.get("nsamples") and r["sparsity_target"] == 0.5]
    evals = sorted({(r["eval"], r["eval_chunks"]) for r in table}, key=lambda e: e[1])
    head = " | ".join(f"ppl {src} {k}x{s.get('seqlen')}" for src, k in evals)
    lines += [f"| pattern | method | measured sparsity | {head} | published code | prune s |",
              "|---|---|---:|" + "---:|" * len(evals) + "---:|---:|"]
    order = [("dense", "unstructured")] + [(m, p) for p, _ in PATTERNS for m in METHODS]
    for method, pattern in order:
        found = {(r["eval"], r["eval_chunks"]): r for r in table if r["method"] == method and r["structure"] == pattern}
        if not found:
            continue
        any_row = next(iter(found.values()))
        ppl = " | ".join(f"{found[e]['perplexity']:.3f}" if e in found else "" for e in evals)
        t = any_row.get("prune_s")
        # G's time is kept per calibration set, so a retimed G shows in every row that uses it
        g_s = data.get("gradients_s", {}).get(str(any_row["nsamples"]), any_row.get("gradients_s"))
        alone = str(any_row["nsamples"]) in data.get("gradients_alone", [])
        g = f" (+{g_s:.0f} G{'' if alone else '*'})" if "gradients_s" in any_row else ""
        g += "" if any_row.get("timed_alone") or t is None else "*"
        label = "0% (dense)" if method == "dense" else ("50%" if pattern == "unstructured" else pattern)
        pub = PUBLISHED.get((method, pattern))
        lines.append(f"| {label} | {method} | {any_row.get('sparsity', 0):.6f} | {ppl} | "
                     f"{'' if pub is None else f'{pub:.3f}'} | {'' if t is None else f'{t:.1f}{g}'} |")
    lines += _sweep_tables(rows, s) + _allocation_table(rows, s)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(rows, s, out)


def _allocation_table(rows, s):
    got = {(r["method"], r["sparsity_target"]): r for r in rows
           if r["eval_chunks"] == s.get("chunks") and r["nsamples"] == s.get("nsamples")}
    if not any((m, sp) in got for m in ALLOCATION_METHODS if "@" in m for sp in ALLOCATION_SPARSITY):
        return []
    lines = ["", f"Per-layer allocation (unstructured, first {s.get('chunks')} chunks; uniform: every layer at the "
             "target, int(in * sparsity) per row; owl: outlier-weighted, M 5, lambda 0.08, total exactly "
             "int(weights * sparsity); search: each layer's level evolved, KL to the dense model, same total; "
             "prune time includes the search):", "",
             "| method | " + " | ".join(f"{sp:.0%}" for sp in ALLOCATION_SPARSITY) + " |",
             "|---|" + "---:|" * len(ALLOCATION_SPARSITY)]
    for m in ALLOCATION_METHODS:
        lines.append(f"| {m if '@' in m else m + '@uniform'} | " + " | ".join(
            f"{got[(m, sp)]['perplexity']:.2f}" if (m, sp) in got else "" for sp in ALLOCATION_SPARSITY) + " |")
    return lines


def _sweep_tables(rows, s):
    first = [r for r in rows if r["eval_chunks"] == s.get("chunks") and r["structure"] == "unstructured"]
    lines = []
    for title, field, values, fixed in (("sparsity", "sparsity_target", SWEEP_SPARSITY, ("nsamples", s.get("nsamples"))),
                                        ("calibration samples", "nsamples", SWEEP_NSAMPLES, ("sparsity_target", 0.5))):
        got = {(r["method"], r[field]): r["perplexity"] for r in first if r[fixed[0]] == fixed[1]}
        if not any((m, v) in got for m in ("wanda", "pruner-zero") for v in values):
            continue
        lines += ["", f"Perplexity against {title} (unstructured, {fixed[0]} {fixed[1]}, first {s.get('chunks')} chunks):",
                  "", "| method | " + " | ".join(str(v) for v in values) + " |", "|---|" + "---:|" * len(values)]
        for m in ("wanda", "pruner-zero"):
            lines.append(f"| {m} | " + " | ".join(f"{got[(m, v)]:.2f}" if (m, v) in got else "" for v in values) + " |")
    return lines


def _plot(rows, s, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    first = [r for r in rows if r["eval_chunks"] == s.get("chunks") and r["structure"] == "unstructured"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for metric in ("wanda", "pruner-zero"):
        pts = sorted((r["sparsity_target"], r["perplexity"]) for r in first
                     if r["method"] == metric and r["nsamples"] == s.get("nsamples"))
        if pts:
            axes[0].plot(*zip(*pts), marker="o", label=metric)
        pts = sorted((r["nsamples"], r["perplexity"]) for r in first if r["method"] == metric and r["sparsity_target"] == 0.5)
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=metric)
    axes[0].set(xlabel="sparsity (unstructured)", ylabel="WikiText-2 perplexity", yscale="log",
                title=f"calibration {s.get('nsamples')} x {s.get('seqlen')}")
    axes[1].set(xlabel="calibration samples", ylabel="WikiText-2 perplexity", title="50% unstructured")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xticks(SWEEP_NSAMPLES, [str(n) for n in SWEEP_NSAMPLES])
    axes[1].minorticks_off()
    dense = [r["perplexity"] for r in first if r["method"] == "dense"]
    for ax in axes:
        if dense:
            ax.axhline(dense[0], color="grey", linestyle="--", linewidth=1, label="dense")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{s.get('model')}, first {s.get('chunks')} chunks of {s.get('seqlen')} tokens")
    fig.tight_layout()
    fig.savefig(out.parent / (out.name + "_sweeps.png"), dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="table,sweeps,full", help="any of table,sweeps,allocation,full,times")
    ap.add_argument("--model", default=None)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--allocation-generations", type=int, default=12)
    ap.add_argument("--allocation-methods", default=",".join(ALLOCATION_METHODS),
                    help="comma-separated subset (in this order) for the allocation part")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset of the methods for the table, times and full parts")
    common_options(ap, "bench_pruning", runs=False)
    args = ap.parse_args()
    out = Path(args.out)
    if args.report_only:
        return report(json.loads(out.with_suffix(".json").read_text()), out)
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    bench = Bench(args)
    parts = args.parts.split(",")
    if "table" in parts:
        bench.run("dense")
        for structure, sparsity in PATTERNS:
            for method in methods:
                bench.run(method, structure, sparsity)
                report(bench.data, out)
    if "allocation" in parts:
        for sp in ALLOCATION_SPARSITY:
            for method in args.allocation_methods.split(","):
                bench.run(method, "unstructured", sp)
                report(bench.data, out)
    if "sweeps" in parts:
        for metric in ("wanda", "pruner-zero"):
            for sp in SWEEP_SPARSITY:
                bench.run(metric, "unstructured", sp)
            for n in SWEEP_NSAMPLES:
                bench.run(metric, "unstructured", 0.5, nsamples=n)
            report(bench.data, out)
    if "times" in parts:
        bench.retime_gradients()
        for structure, sparsity in PATTERNS:
            for method in methods:
                bench.retime(method, structure, sparsity)
    if "full" in parts:
        bench.run("dense", full=True)
        for method in methods:
            bench.run(method, "unstructured", 0.5, full=True)
            report(bench.data, out)
    report(bench.data, out)


if __name__ == "__main__":
    main()
