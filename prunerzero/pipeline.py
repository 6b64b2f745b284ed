"""End-to-end runs behind `prunerzero apply` and `prunerzero eval`: load, calibrate,
evaluate, prune, save."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data
from .calibration import cached, compute_g, compute_h, compute_x
from .evaluate import perplexity
from .masks import parse_structure
from .metric import Metric
from .models import load_model, require_prunable
from .prune import PruneError, apply_metric, apply_sparsegpt


@dataclass
class EvalData:
    chunks: torch.Tensor
    source: str
    note: str = ""


def calibration_for(tokenizer, source="wikipedia", nsamples=32, seqlen=512, seed=0, data_dir=None,
                    seq: data.Sequences = data.NO_BOS):
    """Calibration samples, the tokenized source they came from, and their start offsets."""
    ids = data.tokenize(tokenizer, data.load_text(source, data_dir))
    samples, starts = data.calibration_samples(ids, nsamples, seqlen, seed, seq)
    return samples, ids, starts


def eval_data_for(tokenizer, source=None, seqlen=512, chunks=None, data_dir=None,
                  calibration_source="wikipedia", calib_ids=None, calib_starts=(),
                  seq: data.Sequences = data.NO_BOS):
    """WikiText-2 test chunks; if the user named no source and WikiText-2 cannot be found,
    held-out Wikipedia chunks disjoint from the calibration windows, said plainly."""
    try:
        ids = data.tokenize(tokenizer, data.load_text(source or "wikitext2", data_dir))
        return EvalData(data.chunks(ids, seqlen, chunks, seq=seq), source or "wikitext2")
    except data.DataError as e:
        if source is not None:
            raise
        if calib_ids is None or calibration_source != "wikipedia":
            calib_ids = data.tokenize(tokenizer, data.wikipedia_text())
            calib_starts = ()
        exclude = [(s, s + seq.text_len(seqlen)) for s in calib_starts]
        note = (f"WikiText-2 was not found ({str(e).split(':')[0]}); perplexity is measured on held-out "
                "Wikipedia summaries (chunks disjoint from the calibration windows), NOT on WikiText-2")
        return EvalData(data.chunks(calib_ids, seqlen, chunks, exclude=exclude, seq=seq), "wikipedia-heldout", note)


def dense_primitives(model, metric: Metric, samples, settings: dict, sequential: bool):
    """G (and X, H for one-shot pruning) of the dense model, from the on-disk cache when a run
    with the same settings computed them before. Sequential pruning recomputes X and H per block."""
    uses = metric.terminals
    grads = cached("G", settings, lambda: compute_g(model, samples)) if "G" in uses else None
    x = cached("X", settings, lambda: compute_x(model, samples)) if "X" in uses and not sequential else None
    h = cached("H", settings, lambda: compute_h(model, samples)) if "H" in uses and not sequential else None
    return grads, x, h


def model_identity(model_name) -> str:
    """What the primitive cache is keyed on: the id, or a local folder and when its weights changed."""
    path = Path(model_name) if model_name else None
    if path is not None and path.is_dir():
        stamps = sorted(f"{f.name}:{f.stat().st_mtime_ns}" for f in path.glob("*.safetensors"))
        return f"{path.resolve()}|{','.join(stamps)}"
    return model_name or "smollm2-135m (bundled)"


def primitive_settings(model_name, calibration: str, samples: torch.Tensor, seed: int, dtype: str) -> dict:
    """What cached dense primitives are keyed on, shared by `apply` and `evolve`: the model,
    the calibration source and draw, and a hash of the very tokens used."""
    return dict(model=model_identity(model_name), calibration=calibration, nsamples=len(samples),
                seqlen=samples.shape[1], seed=seed, dtype=dtype,
                samples=hashlib.sha256(samples.numpy().tobytes()).hexdigest()[:16])


def run_apply(model_name=None, metric="pruner-zero", sparsity=0.5, structure="unstructured", output=None,
              nsamples=32, seqlen=512, calibration="wikipedia", eval_data=None, eval_chunks=None,
              seed=0, sequential=True, dtype="fp32", device="auto", data_dir=None, eval_dense=True,
              method="metric", group=None, bos="auto", log=print) -> dict:
    parse_structure(structure, sparsity)
    if method not in ("metric", "sparsegpt"):
        raise ValueError(f"method must be 'metric' or 'sparsegpt', got {method!r}")
    m = Metric.parse(metric) if method == "metric" else None
    out = Path(output) if output else None
    if out is not None and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} exists and is not empty")
    t0 = time.perf_counter()
    model, tok = load_model(model_name, dtype=dtype, device=device)
    require_prunable(model)
    t_load = time.perf_counter() - t0
    seq = data.sequences_for(tok, bos)
    log(f"sequences: {seq.describe()}")
    samples, cal_ids, starts = calibration_for(tok, calibration, nsamples, seqlen, seed, data_dir, seq)
    ev = eval_data_for(tok, eval_data, seqlen, eval_chunks, data_dir, calibration, cal_ids, starts, seq)
    if ev.note:
        log("NOTE: " + ev.note)
    ppl = {}
    if eval_dense:
        ppl["dense"] = perplexity(model, ev.chunks)
        log(f"dense perplexity ({ev.source}, {len(ev.chunks)} x {seqlen}): {ppl['dense']:.3f}")
    t1 = time.perf_counter()
    key = primitive_settings(model_name, calibration, samples, seed, dtype)
    if m is None:
        report = apply_sparsegpt(model, sparsity, structure, calibration=samples, sequential=sequential)
    else:
        grads, x_norms, curvature = dense_primitives(model, m, samples, key, sequential)
        t_prims = time.perf_counter() - t1
        report = apply_metric(model, m, sparsity, structure, calibration=samples, sequential=sequential,
                              grads=grads, x_norms=x_norms, curvature=curvature, group=group)
        report.timings["dense_primitives_s"] = t_prims
    ppl["pruned"] = perplexity(model, ev.chunks)
    log(f"pruned with {report.metric} ({report.canonical}) {structure} at {report.sparsity:.4f} measured sparsity: "
        f"perplexity {ppl['pruned']:.3f}")
    report.perplexity = ppl
    report.settings = dict(model=model_name or "smollm2-135m (bundled)", nsamples=nsamples, seqlen=seqlen,
                           calibration=calibration, eval_data=ev.source, eval_chunks=len(ev.chunks), seed=seed,
                           dtype=dtype, device=str(next(model.parameters()).device), method=method,
                           bos=seq.describe(), note=ev.note)
    report.timings["load_s"] = t_load
    result = report.to_dict()
    _check_sparsity(report)
    if out is not None:
        _save(model, tok, out, result)
        log(f"saved pruned model and report.json to {out}")
    return result


def _check_sparsity(report):
    """Refuse a result that pruned clearly less than asked (layers the engine did not reach):
    saving it as "pruned" would be a silent wrong result. More zeros than asked is fine (a
    model that was sparse already)."""
    if report.sparsity < report.target_sparsity - 0.01:
        raise PruneError(f"measured sparsity {report.sparsity:.4f} is below the target {report.target_sparsity:.4f}; "
                         f"nothing was saved (skipped layers: {', '.join(report.skipped) or 'none'})")


def _save(model, tok, out: Path, result: dict):
    """Write into a sibling temporary folder, then rename: no half-written output."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "report.json").write_text(json.dumps(result, indent=2))
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def run_eval(model_name=None, eval_data=None, seqlen=512, eval_chunks=None, dtype="fp32", device="auto",
             data_dir=None, bos="auto", log=print) -> float:
    model, tok = load_model(model_name, dtype=dtype, device=device)
    seq = data.sequences_for(tok, bos)
    log(f"sequences: {seq.describe()}")
    ev = eval_data_for(tok, eval_data, seqlen, eval_chunks, data_dir, seq=seq)
    if ev.note:
        log("NOTE: " + ev.note)
    return perplexity(model, ev.chunks)
