"""`run_evolve`: a whole search run from settings to the run directory, fresh or resumed."""
from __future__ import annotations

import math
from dataclasses import asdict

import torch

from ..calibration import cache_path, cached, compute_g, compute_h, compute_x
from ..data import DataError, sequences_for
from ..metric import Metric
from ..masks import check_widths
from ..models import all_prunable, check_seqlen, load_model, require_prunable
from ..space import load_space
from ..pipeline import calibration_for, eval_data_for, primitive_settings
from .config import SearchConfig
from .evaluator import DENSE, Evaluator, Task
from .gp import from_text, primitive_set
from .evolve import Search, SearchData, _finite, setup_for
from .pools import make_pool
from .rundir import RunDir

COMPUTE = {"X": compute_x, "G": compute_g, "H": compute_h}


def search_data(tok, c: SearchConfig) -> tuple[SearchData, str]:
    """Calibration windows, and evaluation chunks split into the search set (the last
    stages[-1] chunks) and the held-out set (the first heldout_chunks), which never overlap."""
    seq = sequences_for(tok, c.bos)
    samples, ids, starts = calibration_for(tok, c.calibration, c.nsamples, c.seqlen, c.seed, c.data_dir, seq)
    ev = eval_data_for(tok, c.search_data, c.seqlen, None, c.data_dir, c.calibration, ids, starts, seq)
    k, h = c.stages[-1], c.heldout_chunks
    if len(ev.chunks) < k + h:
        raise DataError(f"{ev.source} has {len(ev.chunks)} chunks of {c.seqlen} tokens: too few for "
                        f"{k} search + {h} held-out chunks; lower --stages or --heldout-chunks")
    full = ev.chunks if c.heldout_full else None
    return SearchData(samples, ev.chunks[-k:], ev.chunks[:h], full, ev.source, ev.note, seq.describe()), ev.note


def terminals_needed(c: SearchConfig, pset_terminals) -> set[str]:
    names = set(pset_terminals)
    for text in (*c.baselines, *c.seed_metrics):
        names |= Metric.parse(text).terminals
    return names & set(COMPUTE)


def primitive_files(model, c: SearchConfig, samples: torch.Tensor, needed, log=print) -> dict[str, str]:
    """Dense X, G, H of the calibration samples, from the shared on-disk cache (computed once)."""
    key = primitive_settings(c.model, c.calibration, samples, c.seed, c.dtype)
    files = {}
    for kind in sorted(needed):
        cached(kind, key, lambda kind=kind: COMPUTE[kind](model, samples), names=list(all_prunable(model)), log=log)
        files[kind] = str(cache_path(kind, key))
    return files


def search_evaluator(c: SearchConfig, needed: set[str] | None = None) -> tuple[Evaluator, SearchData]:
    """One in-process evaluator of `c`'s search (model, primitives, chunks), for scoring metrics
    outside a search; `needed` primitives default to those of the search terminals."""
    model, tok = load_model(c.model, c.dtype, c.device)
    data, _ = search_data(tok, c)
    needed = terminals_needed(c, c.terminals or load_space().search["terminals"]) if needed is None else needed
    return Evaluator(setup_for(c, data, primitive_files(model, c, data.calibration, needed)), model=model), data


def run_evolve(config: SearchConfig | None = None, output=None, resume=None, data: SearchData | None = None,
               generations: int | None = None, log=print, quiet: bool = False) -> dict:
    """Run (or continue, with resume=RUN) a metric search; returns the final summary."""
    if resume:
        run = RunDir(resume, "evolve")
        config = SearchConfig.from_dict(run.config())
        state = run.load_checkpoint()  # validated now, before any model or data is loaded
        if generations:
            config.generations = generations
    else:
        config = config or SearchConfig()
        run = RunDir(output, "evolve")
        run.ensure_new()
        state = None
    _check_metrics(config)
    model, tok = load_model(config.model, config.dtype, config.device, tokenizer=data is None)
    if data is None:  # given data carries its own sequence length
        check_seqlen(model, config.seqlen)
    check_widths(require_prunable(model), config.structure)
    note = ""
    if data is None:
        data, note = search_data(tok, config)
    if note:
        log("NOTE: " + note)
    if data.sequences:
        log(f"sequences: {data.sequences}")
    search = None
    pool = None
    try:
        needed = terminals_needed(config, config.terminals or load_space().search["terminals"])
        files = primitive_files(model, config, data.calibration, needed, log)
        if not resume:
            run.create(dict(config.to_dict(), data=dict(source=data.source, note=data.note or note,
                                                         sequences=data.sequences,
                                                         search_chunks=len(data.search),
                                                         heldout_chunks=len(data.heldout))))
        pool = make_pool(setup_for(config, data, files), config.workers, config.ray, config.ray_address,
                         config.gpus_per_worker, model=model)
        search = Search(config, run, pool, log, quiet)
        if not (resume and run.resume(search, log, state)):
            search.seed_rngs()
            search.reference = reference_fitness(search, config)
            search.checkpoint()
        while search.gen < config.generations:
            search.step()
            search.checkpoint()
            if config.time_limit and search.counters.elapsed_s > config.time_limit:
                log(f"time limit {config.time_limit:.0f} s reached after generation {search.gen - 1}")
                break
        return finish(search, data, config, run, log)
    finally:
        if pool is not None:
            pool.close()


def _check_metrics(c: SearchConfig):
    """Fail before any model is loaded on seed metrics or baselines that cannot be used."""
    pset = primitive_set(c.terminals, c.operators)
    for text in c.seed_metrics:
        from_text(text, pset)
    for text in c.baselines:
        Metric.parse(text)


def reference_fitness(search: Search, c: SearchConfig) -> dict:
    """Search fitness (all search chunks) of the baselines, for the log and the plot."""
    ppl = search._measure(list(c.baselines), search.stages[-1], "baselines", tag="baselines")
    out = {}
    for name in c.baselines:
        key = search.cache.describe(name)[1]
        out[name] = ppl[key]
        search.log(f"baseline {name:12} search perplexity {ppl[key]:.3f}")
    return out


def finish(search: Search, data: SearchData, c: SearchConfig, run: RunDir, log) -> dict:
    """Re-evaluate the hall of fame and the baselines on the held-out chunks (and the whole
    split if asked), and write hall_of_fame.json."""
    hof = [search.cache.describe(str(ind)) for ind in search.hof]
    entries = [(s, str(ind), key, ind.fitness.values[1]) for (s, key, _), ind in zip(hof, search.hof)]
    baselines = [(search.cache.describe(b)[0], b, search.cache.describe(b)[1], search.reference.get(b)) for b in c.baselines]
    rows = [(DENSE, DENSE, DENSE, None)] + baselines + entries
    sets = ["heldout"] + (["full"] if data.full is not None else [])
    measured = {}
    for name in sets:
        n = len(data.heldout if name == "heldout" else data.full)
        results = search.pool.map([Task(r[0], 0, n, name) for r in rows])
        measured[name] = [r.perplexity for r in results]

    def row(i, r):
        simplified, expr, key, fit = r
        d = dict(expression=expr, simplified=simplified, canonical=key, search_perplexity=_finite(fit))
        for name in sets:
            d[f"{name}_perplexity"] = _finite(measured[name][i])
        return d
    out = dict(dense=row(0, rows[0]),
               baselines={b[1]: row(1 + i, b) for i, b in enumerate(baselines)},
               hall_of_fame=[row(1 + len(baselines) + i, e) for i, e in enumerate(entries)],
               heldout=dict(source=data.source, chunks=len(data.heldout), seqlen=data.heldout.shape[1],
                            note=data.note, sequences=data.sequences),
               counters=asdict(search.counters), generations=search.gen, settings=c.to_dict())
    run.write_json("hall_of_fame.json", out)
    _print_summary(out, log)
    return out


def _print_summary(out, log):
    h = out["heldout"]
    log(f"held-out perplexity ({h['source']}, {h['chunks']} x {h['seqlen']}):")
    log(f"  {'dense':40} {out['dense']['heldout_perplexity'] or math.inf:10.3f}")
    for name, b in out["baselines"].items():
        log(f"  {name:40} {b['heldout_perplexity'] or math.inf:10.3f}")
    for i, e in enumerate(out["hall_of_fame"]):
        log(f"  #{i + 1} {e['simplified'][:37]:37} {e['heldout_perplexity'] or math.inf:10.3f}")
