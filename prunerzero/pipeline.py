"""End-to-end runs behind `prunerzero apply` and `prunerzero eval`: load, calibrate,
evaluate, prune, save."""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import progress
from .progress import say, saying
from . import checks, data
from .apply_config import ApplyConfig, EvalConfig
from .search.allocation import AllocationSearchConfig
from .engine.calibration import cache_key, cached, compute_g, compute_h, compute_x
from .engine.evaluate import perplexity
from .engine.masks import check_widths
from .language.metric import Metric
from .engine.blocks import onloading
from .engine.models import (all_prunable, cache_dir, check_calibration_memory, check_seqlen, dtype_name,
                            finish_saved_config, placement,
                            require_prunable)
from .loading import load_model
from .runs.output import Output
from .engine.prune import PruneError, apply_sparsegpt
from .recipes import apply_metric


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


WIKIPEDIA_HELDOUT = "wikipedia-heldout"  # Wikipedia chunks disjoint from the calibration windows


def eval_data_for(tokenizer, source=None, seqlen=512, chunks=None, data_dir=None,
                  calibration_source="wikipedia", calib_ids=None, calib_starts=(),
                  seq: data.Sequences = data.NO_BOS):
    """WikiText-2 test chunks; if the user named no source and WikiText-2 cannot be found,
    held-out Wikipedia chunks disjoint from the calibration windows, said plainly."""
    if source == WIKIPEDIA_HELDOUT:
        return heldout_wikipedia(tokenizer, seqlen, chunks, calibration_source, calib_ids, calib_starts, seq)
    try:
        ids = data.tokenize(tokenizer, data.load_text(source or "wikitext2", data_dir))
        return EvalData(data.chunks(ids, seqlen, chunks, seq=seq), source or "wikitext2")
    except data.DataError as e:
        if source is not None:
            raise
        ev = heldout_wikipedia(tokenizer, seqlen, chunks, calibration_source, calib_ids, calib_starts, seq)
        ev.note = ("WikiText-2 not found (give --data-dir or PRUNERZERO_DATA_DIR, or reach the hub): perplexity "
                   "is on held-out Wikipedia, NOT WikiText-2")
        return ev


def heldout_wikipedia(tokenizer, seqlen=512, chunks=None, calibration_source="wikipedia", calib_ids=None,
                      calib_starts=(), seq: data.Sequences = data.NO_BOS) -> EvalData:
    """Chunks of the bundled Wikipedia summaries that no calibration window overlaps."""
    if calib_ids is None or calibration_source != "wikipedia":
        calib_ids = data.tokenize(tokenizer, data.wikipedia_text())
        calib_starts = ()
    exclude = [(s, s + seq.text_len(seqlen)) for s in calib_starts]
    return EvalData(data.chunks(calib_ids, seqlen, chunks, exclude=exclude, seq=seq), WIKIPEDIA_HELDOUT)


_NOTES_SAID: set = set()


def note(text: str) -> None:
    """A NOTE line, once per process (a notebook that runs many commands sees it once)."""
    if text and text not in _NOTES_SAID:
        _NOTES_SAID.add(text)
        say("NOTE: " + text)


def dense_primitives(model, metric: Metric, samples, settings: dict, sequential: bool):
    """G (and X, H for one-shot pruning) of the dense model, from the on-disk cache when a run
    with the same settings computed them before. Sequential pruning recomputes X and H per block."""
    uses = metric.terminals
    names = list(all_prunable(model))

    def get(kind, compute):
        return cached(kind, settings, compute, names=names)
    grads = get("G", lambda: compute_g(model, samples)) if "G" in uses else None
    x = get("X", lambda: compute_x(model, samples)) if "X" in uses and not sequential else None
    h = get("H", lambda: compute_h(model, samples)) if "H" in uses and not sequential else None
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


def _settings(kind, config, settings: dict):
    """A settings object from `config` or from keyword settings, never both (settings beside a
    config would otherwise be silently ignored)."""
    if config is not None and settings:
        raise checks.SettingsError(f"give either config=({kind.__name__}) or keyword settings "
                                   f"({', '.join(settings)}), not both")
    return config if config is not None else kind(**settings)


def run_apply(config: ApplyConfig | None = None, output=None, log=progress.log, **settings) -> dict:
    """Prune a model as `config` (or ApplyConfig(**settings)) says, measure perplexity before and
    after, and save the model with report.json in `output` (when given)."""
    cfg = _settings(ApplyConfig, config, settings)
    m = Metric.parse(cfg.metric) if cfg.method == "metric" else None
    tasks_runnable(cfg)
    out = Output(output).check() if output is not None else None  # locked until the run ends
    try:
        with saying(log):
            return _apply(cfg, m, out)
    finally:
        if out is not None:
            out.close()


def _apply(cfg: ApplyConfig, m: Metric | None, out: Output | None) -> dict:
    t0 = time.perf_counter()
    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    if out is not None:  # a disk that cannot hold the result is refused now, not after the prune
        out.room(sum(p.numel() * p.element_size() for p in model.parameters()) + (64 << 20))
    check_seqlen(model, cfg.seqlen)
    check_widths(require_prunable(model), cfg.structure)
    check_calibration_memory(model, cfg.nsamples, cfg.seqlen, gradients=m is not None and "G" in m.terminals)
    t_load = time.perf_counter() - t0
    if onloading(model):
        say(f"model on {placement(model)}: it does not fit on the device whole")
    seq = data.sequences_for(tok, cfg.bos)
    say(f"sequences: {seq.describe()}")
    samples, cal_ids, starts = calibration_for(tok, cfg.calibration, cfg.nsamples, cfg.seqlen, cfg.seed,
                                               cfg.data_dir, seq)
    ev = eval_data_for(tok, cfg.eval_data, cfg.seqlen, cfg.eval_chunks, cfg.data_dir, cfg.calibration, cal_ids,
                       starts, seq)
    note(ev.note)
    ppl = {}
    if cfg.eval_dense:
        ppl["dense"] = perplexity(model, ev.chunks)
        say(f"dense perplexity ({ev.source}, {len(ev.chunks)} x {cfg.seqlen}): {ppl['dense']:.3f}")
    report = _prune(model, m, cfg, samples)
    ppl["pruned"] = perplexity(model, ev.chunks)
    update = f", update {cfg.update}" if cfg.update != "none" else ""
    say(f"pruned with {report.metric} ({report.canonical}{update}) {cfg.structure} at {report.sparsity:.4f} "
        f"measured sparsity: perplexity {ppl['pruned']:.3f}")
    report.perplexity = ppl
    zero_shot = zero_shot_for(model, tok, cfg)
    report.settings = dict(cfg.to_dict(), model=cfg.model or "smollm2-135m (bundled)", eval_data=ev.source,
                           eval_chunks=len(ev.chunks), device=placement(model),
                           bos=seq.describe(), note=ev.note)
    report.timings["load_s"] = t_load
    result = report.to_dict()
    if zero_shot:
        result["zero_shot"] = zero_shot
    _check_sparsity(report)
    if out is not None:
        check_finite(model, ppl)
        out.save(lambda folder: _write(model, tok, folder, result))
        say(f"saved pruned model and report.json to {out.shown}")
    return result


def _prune(model, m: Metric | None, cfg: ApplyConfig, samples):
    """Prune in place with the metric `m`, or SparseGPT when m is None."""
    if m is None:
        return apply_sparsegpt(model, cfg.sparsity, cfg.structure, calibration=samples, sequential=cfg.sequential)
    t1 = time.perf_counter()
    key = primitive_settings(cfg.model, cfg.calibration, samples, cfg.seed, dtype_name(model))
    grads, x_norms, curvature = dense_primitives(model, m, samples, key, cfg.sequential)
    t_prims = time.perf_counter() - t1
    allocation = cfg.allocation
    if allocation == "search":
        allocation = allocation_search_for(cfg, m, key)
        say(f"allocation search: {allocation.generations} generations, run folder {allocation.run}")
    report = apply_metric(model, m, cfg.sparsity, cfg.structure, calibration=samples, sequential=cfg.sequential,
                          grads=grads, x_norms=x_norms, curvature=curvature, group=cfg.group, update=cfg.update,
                          allocation=allocation)  # recipes.apply_metric: a search runs first
    report.timings["dense_primitives_s"] = t_prims
    return report


def allocation_search_for(cfg: ApplyConfig, m: Metric, primitives_key: dict) -> AllocationSearchConfig:
    """The allocation search of an `apply`, its run folder in the cache keyed by everything it
    depends on, so an interrupted search continues and a finished one is reused."""
    search = AllocationSearchConfig(generations=cfg.allocation_generations, seed=cfg.seed)
    key = cache_key(kind="allocation", metric=m.canonical(), group=m.group, sparsity=cfg.sparsity,
                    search={k: v for k, v in search.to_dict().items() if k not in ("generations", "time_limit")},
                    **primitives_key)
    search.run = str(cache_dir() / "allocations" / key)
    return search


def _check_sparsity(report):
    """Refuse a result that pruned clearly less than asked (layers the engine did not reach):
    saving it as "pruned" would be a silent wrong result. More zeros than asked is fine (a
    model that was sparse already)."""
    if report.sparsity < report.target_sparsity - 0.01:
        raise PruneError(f"measured sparsity {report.sparsity:.4f} is below the target {report.target_sparsity:.4f}; "
                         f"nothing was saved (skipped layers: {', '.join(report.skipped) or 'none'})")


def check_finite(model, perplexities: dict) -> None:
    """Refuse to save a model whose weights or perplexity are NaN or infinite: a broken result
    must not look like a pruned model."""
    bad = [k for k, v in perplexities.items() if not math.isfinite(v)]
    if bad:
        raise PruneError(f"the {bad[0]} perplexity is {perplexities[bad[0]]}: the model is broken; nothing was saved")
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise PruneError(f"weight {name} holds NaN or infinite values; nothing was saved")


def _write(model, tok, folder: Path, result: dict):
    model.save_pretrained(folder)
    finish_saved_config(folder)
    tok.save_pretrained(folder)
    (folder / "report.json").write_text(json.dumps(result, indent=2))


def run_eval(config: EvalConfig | None = None, log=progress.log, **settings) -> float:
    """Perplexity of a model as `config` (or EvalConfig(**settings)) says."""
    cfg = _settings(EvalConfig, config, settings)
    tasks_runnable(cfg)
    with saying(log):
        model, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
        check_seqlen(model, cfg.seqlen)
        seq = data.sequences_for(tok, cfg.bos)
        say(f"sequences: {seq.describe()}")
        ev = eval_data_for(tok, cfg.eval_data, cfg.seqlen, cfg.eval_chunks, cfg.data_dir, seq=seq)
        note(ev.note)
        ppl = perplexity(model, ev.chunks)
        zero_shot_for(model, tok, cfg)
    return ppl


def tasks_runnable(cfg) -> None:
    """Fail at once, before any model is loaded, on zero-shot tasks that cannot run (unknown, or
    needing the hub offline)."""
    if cfg.tasks:
        from .zeroshot import check_tasks
        check_tasks(list(cfg.tasks), cfg.include_path)


def zero_shot_for(model, tok, cfg: EvalConfig) -> dict:
    """cfg.tasks' zero-shot accuracies of the model (none asked: {}), logged as a table."""
    if not cfg.tasks:
        return {}
    from .zeroshot import run_tasks, table
    t0 = time.perf_counter()
    limit = int(cfg.task_limit) if cfg.task_limit is not None and cfg.task_limit >= 1 else cfg.task_limit
    results = run_tasks(model, tok, list(cfg.tasks), cfg.num_fewshot, cfg.task_batch_size, limit,
                        cfg.include_path, getattr(cfg, "seed", 0))
    say(table(results))
    say(f"zero-shot tasks {', '.join(cfg.tasks)}: {time.perf_counter() - t0:.0f} s")
    return results
