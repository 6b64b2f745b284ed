"""`run_darwin`: a whole DarwinLM run, fresh or resumed: database, search, the final smaller
model (and the baselines at the same parameter count), post-training, perplexity, speed,
saved model, report.json and plots in the run folder."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import progress
from ..progress import say, saying
from ..engine.calibration import cache_key
from ..data import calibration_samples, sequences_for
from ..engine.evaluate import perplexities
from ..engine.models import cache_dir, check_calibration_memory, check_seqlen, concrete_dtype, hand_back_memory
from ..loading import load_model
from ..pipeline import check_finite, note, tasks_runnable, model_identity, calibration_for, eval_data_for, zero_shot_for
from ..runs.checkpoint import CheckpointError
from ..runs.output import Output
from ..runs.pools import make_pool
from ..runs.rundir import RunDir, contained
from ..settings import resume_overrides, with_overrides
from .config import DarwinConfig
from .database import build_database, database_settings
from .fitness import DenseReference, light_train
from .genome import LevelSpace
from .scorer import ScoreSetup, Scorer
from .search import DarwinSearch, FitnessData, run_loop
from .shrink import materialize, save_structured
from .speed import latency
from .units import StructureError, check_supported, prunable_params


@dataclass
class DarwinData:
    calibration: torch.Tensor      # windows for the database Hessians
    fitness: torch.Tensor          # windows for selection: first half scored, second half trained on
    evaluation: torch.Tensor       # perplexity chunks of the final models
    source: str = "given"
    note: str = ""
    sequences: str = ""                # the BOS protocol, as data.Sequences.describe() says it


def darwin_data(tok, c: DarwinConfig) -> DarwinData:
    seq = sequences_for(tok, c.bos)
    samples, ids, starts = calibration_for(tok, c.calibration, c.nsamples, c.seqlen, c.seed, c.data_dir, seq)
    fitness, fstarts = calibration_samples(ids, c.fitness_windows, c.seqlen, c.seed + 1, seq)
    ev = eval_data_for(tok, c.eval_data, c.seqlen, None if c.eval_full else c.eval_chunks, c.data_dir, c.calibration, ids,
                       list(starts) + list(fstarts), seq)
    return DarwinData(samples, fitness, ev.chunks, ev.source, ev.note, seq.describe())


def database_path(c: DarwinConfig, samples: torch.Tensor):
    settings = database_settings(model_identity(c.model), c.calibration, len(samples), samples.shape[1], c.seed,
                                 c.ladder, c.multiple, c.percdamp,
                                 concrete_dtype(c.model, c.dtype, c.device))
    path = c.database or cache_dir() / "darwin" / cache_key(**settings)
    return path, settings


def run_darwin(config: DarwinConfig | None = None, output=None, resume=None, data: DarwinData | None = None,
               generations: int | None = None, time_limit: float | None = None, log=progress.log,
               quiet: bool = False, overrides: dict | None = None) -> dict:
    """Run (or continue, with resume=RUN) a structured search; returns the report. A resume may
    be given `overrides` of settings.RESUMABLE, include_path (task code is never taken from a run
    folder) and database (to confirm a database outside the run folder and the cache)."""
    if resume:
        overrides = resume_overrides(overrides, generations, time_limit)
        run, state, config = RunDir.open_resumed(resume, "darwin", lambda run: resumed_config(run, overrides))
    else:
        config = config or DarwinConfig()
        run = RunDir(output, "darwin")
        run.ensure_new()
        state = None
    try:
        with saying(log):
            return _darwin(config, run, resume, state, data, quiet)
    finally:
        run.release()


def resumed_config(run: RunDir, overrides: dict) -> DarwinConfig:
    """A resumed run's settings, treated as data from elsewhere: no task code (include_path) from
    the folder, and a database it would write to only inside the folder or the cache, unless the
    user names that same database on the command line."""
    overrides = dict(overrides)
    confirmed = overrides.pop("database", None)
    config = DarwinConfig.from_dict(dict(run.config(), include_path=None))
    config = with_overrides(config, overrides, also=("include_path",))
    db = config.database
    if db is not None and not contained(db, [run.path, cache_dir()]):
        if confirmed is None or Path(confirmed).resolve() != Path(db).resolve():
            raise CheckpointError(f"{run.shown} names the level database {db}, outside the run folder and the "
                                  f"cache; a run folder may not choose where prunerzero writes. If it is yours, "
                                  f"confirm it with --database {db}")
    return config


def _darwin(config: DarwinConfig, run: RunDir, resume, state, data, quiet) -> dict:
    c = config
    tasks_runnable(c)
    if c.threads:
        torch.set_num_threads(c.threads)
    # darwin's fitness and training run the whole model: never onloaded block by block
    model, tok = load_model(c.model, c.dtype, c.device, tokenizer=data is None, onload="never")
    check_supported(model)  # refuse a family it cannot shrink before any data or database work
    if data is None:  # given data carries its own sequence length
        check_seqlen(model, c.seqlen)
        check_calibration_memory(model, max(c.nsamples, c.fitness_windows), c.seqlen)
    total = prunable_params(model)
    if c.target > total:
        raise StructureError(f"--target-params {c.target:g} is more than the model's {total:,} prunable parameters; "
                             f"give a fraction in (0, 1] or a count up to {total:,}")
    data = data or darwin_data(tok, c)
    note(data.note)
    if data.sequences:
        say(f"sequences: {data.sequences}")
    t0 = time.perf_counter()
    path, settings = database_path(c, data.calibration)
    db = build_database(model, data.calibration, path, settings, c.ladder, c.multiple, c.percdamp,
                        progress=not quiet)
    t_db = time.perf_counter() - t0
    space = LevelSpace.of_database(db)
    start = space.uniform(c.target)
    half = len(data.fitness) // 2
    fit = FitnessData(DenseReference(model, data.fitness[:half]), data.fitness[half:])
    search = DarwinSearch(c, model, space, fit, run, quiet)
    if not (resume and run.resume(search, state)):
        run.create(dict(c.to_dict(), database=str(path), include_path=None,
                        data=dict(source=data.source, note=data.note, sequences=data.sequences),
                        params=dict(prunable=space.total, target=space.target_params(c.target),
                                    start=space.params(start))))
        say(f"{space.total:,} prunable parameters; keeping {space.params(start):,} "
            f"({space.params(start) / space.total:.3f}) from the uniform start")
        search.start(start)
    if c.workers > 1 or c.ray:
        setup = ScoreSetup(c.model, str(path), fit.reference.windows, fit.train, c.lr, c.dtype, c.device, c.threads)
        with parked(model):
            search.pool = make_pool(setup, c.workers, c.ray, c.ray_address, c.gpus_per_worker, worker=Scorer)
            try:
                run_loop(search)
            finally:
                search.pool.close()
                search.pool = None
    else:
        run_loop(search)
    return finish(search, model, tok, data, c, run, start, t_db, quiet)


@contextmanager
def parked(model):
    """The driver's model in host memory while workers hold theirs on the GPUs, then back."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        yield
        return
    model.to("cpu")
    hand_back_memory()
    try:
        yield
    finally:
        model.to(device)


def finish(search: DarwinSearch, model, tok, data: DarwinData, c: DarwinConfig, run: RunDir, uniform, t_db,
           quiet) -> dict:
    space = search.space
    configs = {"evolved": search.parent}
    if c.baselines:
        configs["uniform"] = uniform
        configs["per-layer error"] = space.by_error(space.params(search.parent))
    ppl, full = {}, {}

    def measure(name, m):
        ppl[name], whole = perplexities(m, data.evaluation, c.eval_chunks, progress=not quiet)
        if c.eval_full:
            full[name] = whole
        say(f"{name:28} perplexity {ppl[name]:.3f}" + (f"  (whole split {whole:.3f})" if c.eval_full else ""))
    measure("dense", model)
    models = {}
    for name, genome in configs.items():
        models[name] = materialize(model, space.db, genome)
        measure(name, models[name])
    if c.finetune_tokens:
        for name, m in models.items():
            finetune(m, data.fitness, c, progress=not quiet)
            measure(f"{name} + finetune", m)
    final = models["evolved"]
    report = _report(search, model, final, configs, ppl, data, c, t_db)
    if c.eval_full:
        report["perplexity_full"] = full
    if c.speed:
        report["speed"] = {"dense": latency(model, 1, c.seqlen), "evolved": latency(final, 1, c.seqlen)}
        report["speed"]["speedup"] = report["speed"]["dense"]["median_s"] / report["speed"]["evolved"]["median_s"]
        say(f"forward latency batch 1 x {c.seqlen}: dense {report['speed']['dense']['median_s']:.3f} s, "
            f"evolved {report['speed']['evolved']['median_s']:.3f} s ({report['speed']['speedup']:.2f}x)")
    if c.tasks and tok is not None:
        report["zero_shot"] = {"evolved": zero_shot_for(final, tok, c)}
    check_finite(final, {k: v for k, v in ppl.items() if k.startswith("evolved")})
    # the run folder is this process's (locked): a model of an earlier finish is replaced whole
    Output(run.path / "model", "output").save(
        lambda folder: save_structured(final, folder, tok, extra={"report": "../report.json"}), replace=True)
    run.write_json("report.json", report)
    plot_allocation(run.path / "allocation.png", space, configs)
    say(f"saved the smaller model to {run.path / 'model'} "
        f"(reload: prunerzero.load_structured('{run.path / 'model'}'))")
    return report


def finetune(model, windows: torch.Tensor, c: DarwinConfig, progress=True):
    """Post-training on calibration windows, cycling through them, for c.finetune_tokens tokens."""
    steps = -(-c.finetune_tokens // c.seqlen)
    order = torch.arange(steps) % len(windows)
    torch.manual_seed(c.seed)
    return light_train(model, windows[order], c.finetune_lr, progress=progress, desc="post-training")


def _report(search, dense, final, configs, ppl, data, c, t_db) -> dict:
    space = search.space
    total_params = sum(p.numel() for p in final.parameters())
    layers, n = [], space.n_layers
    for i, spec in enumerate(final.prunerzero_structure):
        layers.append(dict(layer=i, heads=len(spec["heads"]), kv_heads=len(spec["kv_heads"]),
                           channels=len(spec["channels"]), attn_params=space.cost[i][search.parent[i]],
                           mlp_params=space.cost[n + i][search.parent[n + i]]))
    return dict(
        params=dict(prunable_dense=space.total, prunable_kept=space.params(search.parent),
                    kept_fraction=space.params(search.parent) / space.total, target=c.target,
                    model_total=total_params, dense_total=sum(p.numel() for p in dense.parameters())),
        perplexity=ppl, eval=dict(source=data.source, chunks=min(c.eval_chunks, len(data.evaluation)),
                                  split_chunks=len(data.evaluation), seqlen=data.evaluation.shape[1], note=data.note,
                                  sequences=data.sequences),
        genomes={k: list(v) for k, v in configs.items()},
        layers=layers, generations=search.gen, evaluations=search.evaluations,
        timings=dict(database_s=t_db, database_build_s=search.space.db.build_s, search_s=search.elapsed),
        settings=c.to_dict())


def plot_allocation(path, space: LevelSpace, configs: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = space.n_layers
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, kind, off in ((axes[0], "attention", 0), (axes[1], "MLP", n)):
        for name, g in configs.items():
            kept = [space.cost[off + i][g[off + i]] / space.cost[off + i][0] for i in range(n)]
            ax.plot(range(n), kept, marker="o", ms=3, label=name)
        ax.set(title=f"{kind}: parameters kept per layer", xlabel="layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("kept fraction")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
