"""`run_evolve`: a whole search run from settings to the run directory, fresh or resumed."""
from __future__ import annotations

import math
import time
from dataclasses import asdict

import torch

from .. import progress
from ..progress import say, saying
from ..engine.calibration import cache_path, cached, compute_g, compute_h, compute_hessians, compute_x, shared_inputs
from ..data import DataError, sequences_for
from ..language.metric import Metric
from ..engine.masks import check_widths
from ..engine.blocks import onloading
from ..engine.layers import matrix
from ..engine.models import (all_prunable, check_calibration_memory, check_seqlen, concrete_dtype, copy_fits,
                             hand_back_memory, placement,
                             require_prunable)
from ..loading import load_model
from ..language.space import load_space
from ..pipeline import WIKIPEDIA_HELDOUT, note as say_note, calibration_for, eval_data_for, primitive_settings
from ..engine.reconstruct import Update
from .config import SearchConfig
from .evaluator import DENSE, Evaluator, Task
from .fidelity import describe, stage_check
from .gp import from_text, primitive_set
from .evolve import BEAT_MARGIN, Search, SearchData, _finite, setup_for
from ..runs.pools import make_pool
from ..runs.rundir import RunDir
from ..checks import SettingsError
from ..settings import resume_overrides, with_overrides

COMPUTE = {"X": compute_x, "G": compute_g, "H": compute_h}


def search_data(tok, c: SearchConfig) -> tuple[SearchData, str]:
    """Calibration windows, and evaluation chunks split into the search set (the last
    stages[-1] chunks) and the held-out set (the first heldout_chunks), which never overlap.
    With --search-data wikipedia-heldout the search set is held-out Wikipedia (disjoint from the
    calibration windows) and the held-out set the usual evaluation text (WikiText-2 test), so
    the reported gain is on text of another source than the one searched on."""
    seq = sequences_for(tok, c.bos)
    samples, ids, starts = calibration_for(tok, c.calibration, c.nsamples, c.seqlen, c.seed, c.data_dir, seq)
    apart = c.search_data == WIKIPEDIA_HELDOUT
    ev = eval_data_for(tok, None if apart else c.search_data, c.seqlen, None, c.data_dir, c.calibration, ids,
                       starts, seq)
    k, h = c.stages[-1], c.heldout_chunks
    pool = ev
    if apart:
        pool = eval_data_for(tok, WIKIPEDIA_HELDOUT, c.seqlen, None, c.data_dir, c.calibration, ids, starts, seq)
    # the two sets are drawn from one pool (the first h and the last k chunks) unless apart
    need = k + h if pool.source == ev.source else k
    if len(pool.chunks) < need or len(ev.chunks) < h:
        raise DataError(f"{pool.source} has {len(pool.chunks)} chunks of {c.seqlen} tokens: too few for "
                        f"{k} search + {h} held-out chunks; lower --stages or --heldout-chunks")
    full = ev.chunks if c.heldout_full else None
    data = SearchData(samples, pool.chunks[-k:], ev.chunks[:h], full, ev.source, ev.note, seq.describe(),
                      search_source=pool.source)
    return data, ev.note


def terminals_needed(c: SearchConfig, pset_terminals) -> set[str]:
    names = set(pset_terminals)
    for text in (*c.baselines, *c.seed_metrics):
        names |= Metric.parse(text).terminals
    return names & set(COMPUTE)


def primitive_files(model, c: SearchConfig, samples: torch.Tensor, needed) -> dict[str, str]:
    """Dense X, G, H of the calibration samples, from the shared on-disk cache (computed once)."""
    key = primitive_settings(c.model, c.calibration, samples, c.seed, concrete_dtype(c.model, c.dtype, c.device))
    files = {}
    for kind in sorted(needed):
        cached(kind, key, lambda kind=kind: COMPUTE[kind](model, samples), names=list(all_prunable(model)))
        files[kind] = str(cache_path(kind, key))
    return files


def hessian_file(model, c: SearchConfig, samples: torch.Tensor) -> str | None:
    """The dense layer-input Hessians that a recipe's update needs, from the shared cache."""
    if c.update == "none":
        return None
    key = primitive_settings(c.model, c.calibration, samples, c.seed, concrete_dtype(c.model, c.dtype, c.device))
    owners = sorted(set(shared_inputs(model, samples).values()))
    cached("XtX", key, lambda: compute_hessians(model, samples), names=owners)
    return str(cache_path("XtX", key))


def search_evaluator(c: SearchConfig, needed: set[str] | None = None) -> tuple[Evaluator, SearchData]:
    """One in-process evaluator of `c`'s search (model, primitives, chunks), for scoring metrics
    outside a search; `needed` primitives default to those of the search terminals."""
    model, tok = load_model(c.model, c.dtype, c.device)
    data, _ = search_data(tok, c)
    needed = terminals_needed(c, c.terminals or load_space().search["terminals"]) if needed is None else needed
    files = primitive_files(model, c, data.calibration, needed)
    return Evaluator(setup_for(c, data, files, hessian_file(model, c, data.calibration)), model=model), data


def run_evolve(config: SearchConfig | None = None, output=None, resume=None, data: SearchData | None = None,
               generations: int | None = None, time_limit: float | None = None, log=progress.log,
               quiet: bool = False, overrides: dict | None = None) -> dict:
    """Run (or continue, with resume=RUN) a metric search; returns the final summary. A time
    limit bounds this whole call: set-up, generations and the final held-out scoring (estimated
    from the measured seconds per evaluated chunk); generations stop when the next would pass it.
    A resume may be given `overrides` of settings.RESUMABLE (generations and time_limit too);
    the run folder is locked while this call writes it."""
    t_start = time.perf_counter()
    if resume:
        overrides = resume_overrides(overrides, generations, time_limit)
        run, state, config = RunDir.open_resumed(
            resume, "evolve", lambda run: with_overrides(SearchConfig.from_dict(run.config()), overrides))
    else:
        config = config or SearchConfig()
        run = RunDir(output, "evolve")
        run.ensure_new()
        state = None
    try:
        with saying(log):
            return _evolve(config, run, resume, state, data, quiet, t_start)
    finally:
        run.release()


def _evolve(config: SearchConfig, run: RunDir, resume, state, data, quiet, t_start) -> dict:
    _check_metrics(config)
    model, tok = load_model(config.model, config.dtype, config.device, tokenizer=data is None)
    if data is None:  # given data carries its own sequence length
        check_seqlen(model, config.seqlen)
        check_calibration_memory(model, config.nsamples, config.seqlen,
                                 gradients="G" in terminals_needed(config, config.terminals
                                                                   or load_space().search["terminals"]))
    check_widths(require_prunable(model), config.structure)
    note = ""
    if data is None:
        data, note = search_data(tok, config)
    say_note(note)
    if data.sequences:
        say(f"sequences: {data.sequences}")
    if config.searches("update") and config.fixed_settings:
        say(f"update settings kept as --update gives them: {', '.join(config.fixed_settings)}")
    search = None
    pool = None
    try:
        needed = terminals_needed(config, config.terminals or load_space().search["terminals"])
        if config.time_limit:
            check_setup_fits(model, config, data.calibration, needed, time.perf_counter() - t_start)
        files = primitive_files(model, config, data.calibration, needed)
        hessians = hessian_file(model, config, data.calibration)
        if not resume:
            run.create(dict(config.to_dict(), data=dict(source=data.source, note=data.note or note,
                                                         search_source=data.search_source,
                                                         sequences=data.sequences,
                                                         search_chunks=len(data.search),
                                                         heldout_chunks=len(data.heldout))))
        if onloading(model):
            say(f"model on {placement(model)}: candidates are evaluated one decoder block at a time")
        elif not copy_fits(all_prunable(model).values()):
            say("candidates are evaluated one decoder block at a time, pruned in place: a copy of every "
                "masked weight would not fit in free memory")
        sizes = {name: matrix(lin).numel() for name, lin in all_prunable(model).items()}
        if config.workers > 1 or config.ray:
            model = None  # the workers load their own: the driver's copy goes before they start
            hand_back_memory()
        pool = make_pool(setup_for(config, data, files, hessians), config.workers, config.ray, config.ray_address,
                         config.gpus_per_worker, model=model, worker=Evaluator)
        search = Search(config, run, pool, quiet, sizes=sizes)
        if not (resume and run.resume(search, state)):
            search.seed_rngs()
            search.reference = reference_fitness(search, config)
            if config.stage_check:
                check = stage_check(search, config.stage_check)
                run.write_json("stage_check.json", check)
                for line in describe(check):
                    say(line)
            search.checkpoint()
        run_generations(search, config, t_start)
        return finish(search, data, config, run)
    finally:
        if pool is not None:
            pool.close()


def run_generations(search: Search, config: SearchConfig, t_start: float) -> None:
    """Step and checkpoint generations until config.generations, or until the next one and the
    final held-out scoring would overrun --time-limit (a generation's cost: an estimate at
    first, then the longest one measured)."""
    gen_s, measured = 0.0, 0.0
    if config.time_limit:
        gen_s = generation_estimate(search, config)
        left = config.time_limit - (time.perf_counter() - t_start) - finish_estimate(search, config)
        say(f"--time-limit {config.time_limit:.0f} s: set-up took {time.perf_counter() - t_start:.0f} s, the "
            f"final held-out scoring needs about {finish_estimate(search, config):.0f} s and a generation about "
            f"{gen_s:.0f} s: " + (f"about {int(left // gen_s)} generation(s) fit" if gen_s and left >= gen_s
                                  else "no generation fits; scoring the baselines held out now"))
    while search.gen < config.generations:
        if config.time_limit:
            spent, reserve = time.perf_counter() - t_start, finish_estimate(search, config)
            if spent + gen_s + reserve > config.time_limit:
                done = f"after generation {search.gen - 1}" if search.gen else "before generation 0"
                say(f"time limit {config.time_limit:.0f} s: stopping {done} "
                    f"({spent:.0f} s spent, another generation takes about {gen_s:.0f} s and the final "
                    f"scoring about {reserve:.0f} s)")
                return
        t_gen = time.perf_counter()
        search.step()
        search.checkpoint()
        measured = max(measured, time.perf_counter() - t_gen)
        gen_s = measured


def setup_estimate(model, c: SearchConfig, samples: torch.Tensor, needed) -> dict[str, float]:
    """Seconds each uncached dense statistic will take: computed on one calibration window here,
    times the windows (the passes are linear in them)."""
    key = primitive_settings(c.model, c.calibration, samples, c.seed, concrete_dtype(c.model, c.dtype, c.device))
    work = {kind: lambda s, kind=kind: COMPUTE[kind](model, s) for kind in sorted(needed)}
    if c.update != "none":
        work["XtX"] = lambda s: compute_hessians(model, s, progress=False)
    out = {}
    with progress.silenced():
        for kind, fn in work.items():
            if cache_path(kind, key).is_file():
                continue
            t0 = time.perf_counter()
            fn(samples[:1])
            out[kind] = (time.perf_counter() - t0) * len(samples)
    return out


def check_setup_fits(model, c: SearchConfig, samples, needed, spent: float) -> None:
    """Refuse, before the work, a --time-limit that the set-up alone would pass, saying what the
    set-up costs here and what to change."""
    est = setup_estimate(model, c, samples, needed)
    total = sum(est.values())
    if not est:
        return
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in est.items())
    if spent + total > c.time_limit:
        drop = " or --terminals without G" if "G" in est else ""
        raise SettingsError(f"--time-limit {c.time_limit:.0f} s cannot be met: the set-up alone takes about "
                            f"{total:.0f} s here ({parts}, for {len(samples)} calibration windows, measured on one); "
                            f"raise --time-limit, or lower --nsamples{drop}")
    say(f"set-up: about {total:.0f} s ({parts}; cached for later runs)")


def generation_estimate(search: Search, c: SearchConfig) -> float:
    """Seconds one generation should take at the measured seconds per chunk: every offspring sees
    the first stage's chunks, the promoted fraction each later stage's, plus one reconstruction for
    each candidate that reaches a reconstructing stage, and one sequential pruning for each that
    reaches the sequential stage."""
    n = search.counters
    if not n.chunk_evals:
        return 0.0
    per_chunk = n.eval_s / n.chunk_evals
    chunks, recon, seq, reach, prev = 0.0, 0.0, 0.0, 1.0, 0
    for i, k in enumerate(c.stages):
        if c.screens(i):      # shortened chunks, which the next stage does not continue
            chunks += reach * k * c.screen_tokens / c.seqlen
            recon += reach if c.reconstructs(i) else 0
            reach *= c.promote
            continue
        if c.sequential(i):   # a fresh model: every chunk of the stage is evaluated again
            chunks += reach * k
            seq += reach
        else:
            chunks += reach * (k - prev)
            if c.reconstructs(i) and not (i and c.reconstructs(i - 1)):
                recon += reach
        prev, reach = k, reach * c.promote
    recon_s = n.recon_s / n.recons if n.recons else 0.0
    seq_s = n.sequential_s / n.sequentials if n.sequentials else 0.0
    # the seconds are each task's own; --workers run that many tasks at once
    return c.population * (chunks * per_chunk + recon * recon_s + seq * seq_s) / c.workers


def finish_estimate(search: Search, c: SearchConfig) -> float:
    """Seconds the final held-out scoring should take: the dense model, the baselines and the hall
    of fame on the held-out chunks, at the seconds per chunk measured so far (0 before any), plus,
    for a recipe search, one reconstruction per pruned model at the seconds each has taken: that
    is paid once per candidate, not per chunk, so it must not be spread over the chunks."""
    n = search.counters
    if not n.chunk_evals:
        return 0.0
    models = 1 + len(c.baselines) + min(c.hof_size, max(len(search.hof), 1))
    if c.sequential(-1):
        recon = n.sequential_s / n.sequentials if n.sequentials else 0.0
    else:
        recon = n.recon_s / n.recons if c.reconstructs(-1) and n.recons else 0.0
    scoring = n.eval_s / n.chunk_evals * c.heldout_chunks
    # the models are scored --workers at a time: the work shared out, but never less than the
    # slowest model (a pruned one) takes alone
    total = scoring * models + recon * (models - 1)
    return max(total / min(c.workers, models), scoring + recon)


def _check_metrics(c: SearchConfig):
    """Fail before any model is loaded on seed metrics or baselines that cannot be used."""
    pset = primitive_set(c.terminals, c.operators)
    for text in c.seed_metrics:
        from_text(text, pset)
    for text in c.baselines:
        Metric.parse(text)


def reference_fitness(search: Search, c: SearchConfig) -> dict:
    """Search fitness (all search chunks) of the baselines, for the log and the plot."""
    ppl = search._measure(list(c.baselines), search.stages[-1], "baselines", tag="baselines", **search.how(-1))
    out = {}
    for name in c.baselines:
        key = search.key(name)
        out[name] = ppl[key]
        say(f"baseline {name:12} search perplexity {ppl[key]:.3f}")
    return out


def finish(search: Search, data: SearchData, c: SearchConfig, run: RunDir) -> dict:
    """Re-evaluate the hall of fame and the baselines on the held-out chunks (and the whole
    split if asked), and write hall_of_fame.json."""
    hof = [search.cache.describe(str(ind)) for ind in search.hof]
    entries = [(s, str(ind), key, ind.fitness.values[1], search.update_of(ind), search.alloc_of(ind),
                search.layer_sparsity(ind)) for (s, key, _), ind in zip(hof, search.hof)]
    baselines = [(search.cache.describe(b)[0], b, search.cache.describe(b)[1], search.reference.get(b), c.update,
                  None, None) for b in c.baselines]
    rows = [(DENSE, DENSE, DENSE, None, c.update, None, None)] + baselines + entries
    sets = ["heldout"] + (["full"] if data.full is not None else [])
    measured = {}
    for name in sets:
        n = len(data.heldout if name == "heldout" else data.full)
        with progress.bar(total=len(rows), desc=f"final scoring ({name}, {n} chunks each)",
                          enabled=not search.quiet) as b:
            results = search.pool.map([Task(r[0], 0, n, name, reconstruct=c.reconstructs(-1),
                                            sequential=c.sequential(-1), update=r[4], allocation=r[6])
                                       for r in rows],
                                      on_result=lambda r: b.update())
        measured[name] = [r.perplexity for r in results]

    def row(i, r):
        simplified, expr, key, fit, update, alloc, layer_sparsity = r
        d = dict(expression=expr, simplified=simplified, canonical=key, search_perplexity=_finite(fit))
        if c.update != "none":
            d["update"] = update
        if alloc is not None:
            d["allocation"] = alloc
            d["allocation_file"] = allocation_file(run, i - len(baselines), alloc, layer_sparsity, search)
        for name in sets:
            d[f"{name}_perplexity"] = _finite(measured[name][i])
        return d
    out = dict(dense=row(0, rows[0]),
               baselines={b[1]: row(1 + i, b) for i, b in enumerate(baselines)},
               hall_of_fame=[row(1 + len(baselines) + i, e) for i, e in enumerate(entries)],
               heldout=dict(source=data.source, chunks=len(data.heldout), seqlen=data.heldout.shape[1],
                            note=data.note, sequences=data.sequences),
               search=dict(source=data.search_source or data.source, chunks=len(data.search)),
               update=Update.parse(c.update).describe(),
               counters=asdict(search.counters), generations=search.gen, settings=c.to_dict())
    out["carry_over"] = carry_over(out)
    run.write_json("hall_of_fame.json", out)
    _print_summary(out)
    _print_next_steps(out, c, run)
    return out


def allocation_file(run: RunDir, rank: int, alloc: str, layer_sparsity: dict | None, search: Search) -> str:
    """RUN/allocation_RANK.json: a hall-of-fame entry's per-layer sparsity in the form
    `apply --allocation FILE` reads (that of the allocation search's allocation.json)."""
    name = f"allocation_{rank}.json"
    levels = layer_sparsity or dict.fromkeys(search.sizes, search.config.sparsity)
    run.write_json(name, dict(sparsity=levels, report=dict(kind="searched", genome=alloc, run=str(run.path),
                                                           sparsity=search.config.sparsity,
                                                           groups=[f"{b}.{k}" for b, k in search.alloc.groups])))
    return str(run.path / name)


def carry_over(out, reference: str = "wanda") -> dict | None:
    """How much of the best candidate's gain over `reference` on the search chunks survives on
    the held-out chunks: gains are 1 - perplexity / reference's, the ratio held-out / search."""
    ref = out["baselines"].get(reference)
    if not ref or not out["hall_of_fame"]:
        return None
    best = out["hall_of_fame"][0]
    vals = (best["search_perplexity"], ref["search_perplexity"], best["heldout_perplexity"], ref["heldout_perplexity"])
    if any(v is None for v in vals):
        return None
    search_gain, heldout_gain = 1 - vals[0] / vals[1], 1 - vals[2] / vals[3]
    # below the margin that separates a better metric from rounding there is no gain to carry
    return dict(reference=reference, search_gain=search_gain, heldout_gain=heldout_gain,
                ratio=heldout_gain / search_gain if search_gain > BEAT_MARGIN else None)


def _print_summary(out):
    h = out["heldout"]
    recipe = "" if out["update"]["kind"] == "none" else f", each with the {out['update']['kind']} update"
    say(f"held-out perplexity ({h['source']}, {h['chunks']} x {h['seqlen']}{recipe}):")
    say(f"  {'dense':40} {out['dense']['heldout_perplexity'] or math.inf:10.3f}")
    for name, b in out["baselines"].items():
        say(f"  {name:40} {b['heldout_perplexity'] or math.inf:10.3f}")
    for i, e in enumerate(out["hall_of_fame"]):
        say(f"  #{i + 1} {e['simplified'][:37]:37} {e['heldout_perplexity'] or math.inf:10.3f}")
    c = out.get("carry_over")
    if c and c["ratio"] is not None:
        say(f"carry-over: {c['search_gain']:+.2%} over {c['reference']} on the search chunks, "
            f"{c['heldout_gain']:+.2%} held out (ratio {c['ratio']:.2f})")


def _print_next_steps(out: dict, c: SearchConfig, run: RunDir):
    """Where the results are, how the best found compares with the best baseline held out (said
    plainly when it is worse), and the command that applies it."""
    say(f"results: {run.shown}/hall_of_fame.json (plot: {run.shown}/fitness.png)")
    if not out["hall_of_fame"]:
        return
    best = out["hall_of_fame"][0]
    base = {k: b["heldout_perplexity"] for k, b in out["baselines"].items() if b["heldout_perplexity"]}
    if best["heldout_perplexity"] and base:
        name = min(base, key=base.get)
        change = best["heldout_perplexity"] / base[name] - 1
        verdict = "better than" if change < 0 else "WORSE than"
        say(f"the best found, {best['simplified']}, is {abs(change):.1%} {verdict} {name} held out "
            f"({best['heldout_perplexity']:.3f} against {base[name]:.3f})"
            + ("; keep using the baseline, or search longer (--resume with more --generations)" if change >= 0 else ""))
    update = best.get("update", c.update)
    recipe = (f' --update "{update}"' if " " in update else f" --update {update}") if update != "none" else ""
    if best.get("allocation_file"):
        recipe += f" --allocation {best['allocation_file']}"
    shape = f"--structure {c.structure}" if c.structure != "unstructured" else f"--sparsity {c.sparsity}"
    say(f'apply it: prunerzero apply --metric "{best["expression"]}"{recipe} {shape} --output pruned')

