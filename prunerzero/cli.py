"""Command line: `prunerzero --help`."""
from __future__ import annotations

import logging
import sys

import click
from click.core import ParameterSource

from .errors import PrunerZeroError

UPDATES = ("none", "obs", "obs-adaptive", "admm", "admm-pcg")  # reconstruct.UPDATES, without importing torch
DTYPES = ("auto", "fp32", "bf16", "fp16")  # checks.DTYPES, likewise


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`), raised where the process is, so it unwinds exactly as
    Ctrl-C does: the same clean-up of half-written output, the same message."""


def _on_sigterm(signum, frame):
    raise Terminated()


class _Group(click.Group):
    """Turns prunerzero's own errors into one clear line and exit status 2; Ctrl-C and SIGTERM
    into the command's interrupt hint and 130 / 143."""

    def invoke(self, ctx):
        import signal
        import threading
        main_thread = threading.current_thread() is threading.main_thread()  # signals need it
        previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
        try:
            return super().invoke(ctx)
        except (PrunerZeroError, FileExistsError, FileNotFoundError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:  # a full disk, a read-only file system: what happened, not a traceback
            where = f" ({e.filename})" if e.filename else ""
            click.echo(f"error: {e.strerror or e}{where}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as e:
            # each command leaves its own hint in ctx.meta, which click shares with the group's context
            hint = ctx.meta.get("interrupted", "interrupted")
            text = hint() if callable(hint) else hint
            if isinstance(e, Terminated):
                text = text.replace("interrupted", "stopped (SIGTERM)", 1)
            click.echo(text, err=True)
            sys.exit(143 if isinstance(e, Terminated) else 130)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)


def _on_interrupt(hint):
    """What Ctrl-C prints: `hint`, or for a callable, what it returns then."""
    click.get_current_context().meta["interrupted"] = (lambda: "interrupted; " + hint()) if callable(hint) \
        else "interrupted; " + hint


def _resume_hint(command: str, folder: str, cached: str):
    """The interrupt hint of a run folder, decided when Ctrl-C comes: --resume once the folder
    holds a run, else the same command again (what was cached so far is reused)."""
    from pathlib import Path

    def hint():
        if (Path(folder) / "config.json").is_file():
            return f"the run continues from its last checkpoint with: prunerzero {command} --resume {folder}"
        return (f"no run was written to {folder} yet; run the same command again ({cached} computed so far "
                "are cached and reused)")
    return hint


class _Stderr(logging.StreamHandler):
    """The prunerzero logger's lines on whatever sys.stderr is when they are written."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    """The logger's lines (steps done, their times, warnings) to stderr, once per process;
    results and the commands' own messages go to stdout."""
    from .progress import logger, set_quiet
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    set_quiet(False)
    logger.setLevel(logging.INFO)


@click.group(cls=_Group)
@click.version_option(package_name="prunerzero")
def main():
    """Evolve symbolic pruning metrics for LLMs, and prune with them."""
    _setup_logging()


@main.command()
@click.argument("expr")
def simplify(expr):
    """Show EXPR (metric text or catalog name) parsed, OOS-simplified, and its ranking key."""
    from .language.metric import Metric
    m = Metric.parse(expr)
    s = m.simplify()
    if m.name:
        click.echo(f"name:       {m.name}")
    click.echo(f"parsed:     {m.tree}")
    click.echo(f"simplified: {s}")
    if s.rules:
        click.echo("rules:      " + ", ".join(f"{k} x{v}" for k, v in sorted(s.rules.items())))
    click.echo(f"canonical:  {m.canonical()}")


@main.command()
@click.option("--operators", is_flag=True, help="Also list the operators and terminals.")
def metrics(operators):
    """List the named metrics of the catalog (primitives/catalog.toml)."""
    from .language.metric import Metric
    from .language.space import load_space
    import shutil
    import textwrap
    space = load_space()
    width = max(len(n) for n in space.catalog) + 2   # every name aligned, however long
    wrap = dict(width=max(60, shutil.get_terminal_size().columns - 1), initial_indent=" " * width,
                subsequent_indent=" " * (width + 2))
    for name, entry in space.catalog.items():
        m = Metric.parse(name)
        recipe = [f"--update {entry.update}"] * (entry.update != "none") + \
            [f"--allocation {entry.allocation}"] * (entry.allocation != "uniform")
        click.echo(f"{name:{width}}{m.simplify()}" + (f"  (recipe: {' '.join(recipe)})" if recipe else ""))
        click.echo(textwrap.fill(f"canonical {m.canonical()}", **wrap))
        click.echo(textwrap.fill(f"source: {entry.source}", **wrap))
    if operators:
        click.echo("\nterminals:")
        for t in space.terminals.values():
            click.echo(f"  {t.name:8} {t.shape:7} {t.sign:12} {t.doc}")
        click.echo("operators:")
        for o in space.operators.values():
            click.echo(f"  {o.name:8} arity {o.arity}  {o.doc}")


def _bos_option():
    return click.option("--bos", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
                        help="A BOS token at the start of every chunk and calibration window: auto does what "
                             "the tokenizer does to a text; never is the published Wanda/SparseGPT protocol.")


def _pool_options(f):
    """Where a search's candidates are evaluated (evolve and darwin alike)."""
    opts = [
        click.option("--workers", default=1, show_default=True,
                     help="Local evaluation processes, one model each (on distinct GPUs when several are visible)."),
        click.option("--threads", type=int, default=None, help="Torch threads per worker (default: torch's)."),
        click.option("--ray", "use_ray", is_flag=True, help="Evaluate on Ray actors (pip install 'prunerzero[ray]')."),
        click.option("--ray-address", default=None, help="Address of an existing Ray cluster."),
        click.option("--gpus-per-worker", type=float, default=None,
                     help="GPUs each Ray actor asks for (default: 1 when the cluster has GPUs, else 0)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _common(f):
    opts = [
        click.option("--model", default=None, help="HF id or folder; default: bundled SmolLM2-135M."),
        click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="auto: the checkpoint's own dtype (fp16 runs as bf16 on a CPU)"),
        click.option("--device", default="auto", show_default=True, help="auto picks CUDA when present."),
        click.option("--seqlen", default=512, show_default=True,
                     help="Tokens per calibration window and evaluation chunk."),
        click.option("--eval-data", default=None, help="wikitext2 (default), wikipedia, or a text file."),
        click.option("--eval-chunks", type=int, default=None, help="Use the first K chunks (default: all)."),
        click.option("--data-dir", default=None, envvar="PRUNERZERO_DATA_DIR",
                     help="Folder holding wikitext-2-raw/wiki.test.raw."),
        _bos_option(),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _task_options(flag: str):
    """lm-eval zero-shot options (`--tasks` on eval, `--eval-tasks` on apply)."""
    def wrap(f):
        opts = [
            click.option(flag, "tasks", default="",
                         help="Comma-separated lm-eval tasks (arc_easy, hellaswag, ...; wiki_lastword works "
                              "offline); needs pip install 'prunerzero[eval]'."),
            click.option("--num-fewshot", type=int, default=None, help="Few-shot examples (default: the task's)."),
            click.option("--task-batch-size", default=8, show_default=True, help="lm-eval batch size."),
            click.option("--limit", "task_limit", type=float, default=None,
                         help="Documents per task: a count, or a fraction below 1."),
            click.option("--include-path", default=None,
                         help="A folder of your own lm-eval task YAML files. Task YAML can run Python code "
                              "(`!function`): give only folders you trust; never taken from a run folder."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f
    return wrap


@main.command()
@_common
@click.option("--metric", default="pruner-zero", show_default=True, help="Metric text or catalog name.")
@click.option("--sparsity", type=float, default=None, help="Fraction pruned: default 0.5; N/M with --structure N:M.")
@click.option("--structure", default="unstructured", show_default=True, help="unstructured, 2:4, 4:8, ...")
@click.option("--output", default=None, help="Folder for the pruned model and report.json.")
@click.option("--nsamples", default=32, show_default=True, help="Calibration windows (of --seqlen tokens).")
@click.option("--calibration", default="wikipedia", show_default=True, help="wikipedia, wikitext2 or a text file.")
@click.option("--seed", default=0, show_default=True, help="Seed of the calibration draw and of every random choice.")
@click.option("--one-shot", is_flag=True, help="Score every layer from the dense model's activations.")
@click.option("--method", type=click.Choice(["metric", "sparsegpt"]), default="metric", show_default=True,
              help="sparsegpt: second-order reconstruction instead of a metric (--metric is ignored).")
@click.option("--group", type=click.Choice(["row", "layer"]), default=None,
              help="Unstructured comparison group (default: the metric's published one, else row).")
@click.option("--update", default=None,
              help="Reconstruct the kept weights after each layer's mask (docs/pruning.md). none: the mask alone; "
                   "obs: SparseGPT's sweep on the fixed mask (about SparseGPT's time); obs-adaptive: the sweep, "
                   "re-scoring as it goes; admm: 20 ADMM iterations re-choosing the mask over 15 (the best models, "
                   "about 1.4x SparseGPT's time on a CPU); admm-pcg: admm, then 10 conjugate-gradient steps on the "
                   "final mask (ALPS' refinement, a tenth more). A kind may carry parameters, as searched recipes "
                   "do: \"admm rho=0.5 iters=30\" (percdamp, rho, iters, gradual, refine). Any kind also takes "
                   "correct=c (fit a share c of the dense model's output, not only the layer's own: 0.2 is best "
                   "measured; it runs the dense model beside, about 1.8x SparseGPT's time in all) and staged=1 "
                   "(each block's layers pruned in forward order, later ones on the inputs the pruned earlier ones "
                   "give; a block then runs once on its pruned stream, not twice: admm staged=1 takes about "
                   "SparseGPT's time) and tune=E (each pruned block's kept weights then tuned together towards the "
                   "dense block's outputs: E epochs of Adam, one calibration window a step, tune_lr=1e-3; it runs "
                   "the dense model beside, and each epoch a forward and backward pass of every block); "
                   "dense_windows=K runs that dense model on the first K calibration windows only (correct= "
                   "estimated from them, tune= fitting them; a fraction of the cost). admm and admm-pcg take "
                   "bf16=1: the iterations that re-choose the mask multiply in bfloat16, the rest in fp32 (the "
                   "same layer error; 4-6x faster products on GPUs and on CPUs with bf16 units, for large "
                   "models). Default: the "
                   "catalogued recipe's, else none.")
@click.option("--allocation", default=None,
              help="Per-layer sparsity (unstructured): uniform; owl gives blocks with more outliers fewer pruned "
                   "weights; search evolves each layer's sparsity (KL to the dense model); or a FILE.json of "
                   "per-layer sparsities that a search saved (evolve --search allocation writes "
                   "RUN/allocation_1.json). Default: the catalogued recipe's, else uniform.")
@click.option("--allocation-generations", default=20, show_default=True,
              help="Generations of --allocation search (a rerun with more continues the cached search).")
@_task_options("--eval-tasks")
@click.option("--quiet", is_flag=True, help="No progress bars or step lines; errors and the final line only.")
def apply(model, dtype, device, seqlen, eval_data, eval_chunks, data_dir, bos, metric, sparsity, structure, output,
          nsamples, calibration, seed, one_shot, method, group, update, allocation, allocation_generations, tasks,
          num_fewshot, task_batch_size, task_limit, include_path, quiet):
    """Prune a model with a metric (or SparseGPT), report perplexity, and save it."""
    from .apply_config import ApplyConfig
    from .pipeline import run_apply
    _on_interrupt("nothing was saved (a half-written output is removed); run the command again")
    cfg = ApplyConfig(model=model, metric=metric, method=method, sparsity=sparsity, structure=structure, group=group,
                      update=update, allocation=allocation, allocation_generations=allocation_generations,
                      nsamples=nsamples, seqlen=seqlen, calibration=calibration, eval_data=eval_data,
                      eval_chunks=eval_chunks, seed=seed, sequential=not one_shot, dtype=dtype, device=device,
                      data_dir=data_dir, bos=bos, tasks=tasks, num_fewshot=num_fewshot,
                      task_batch_size=task_batch_size, task_limit=task_limit, include_path=include_path)
    result = run_apply(cfg, output, log=_log(quiet))
    if quiet:  # the one line a quiet run still prints: what it got
        click.echo(f"perplexity {result['perplexity']['pruned']:.3f}" + (f", saved to {output}" if output else ""))


def _log(quiet):
    """The run's message callback; quiet also silences bars and the logger's info lines."""
    from .progress import set_quiet
    if quiet:  # otherwise the logger keeps the INFO level _setup_logging gave it
        set_quiet(True)
    return (lambda *a: None) if quiet else click.echo


# options a --resume may be given, by parameter name (the settings field where it differs)
_RESUME_OPTIONS = {"generations": "generations", "time_limit": "time_limit", "workers": "workers",
                   "threads": "threads", "use_ray": "ray", "ray_address": "ray_address",
                   "gpus_per_worker": "gpus_per_worker", "include_path": "include_path", "database": "database"}


def _resumed(run_fn, output, resume, log, quiet) -> bool:
    """Continue a run when --resume is given, with the options typed on this command line that a
    resume may change (see settings.with_overrides); any other typed option is refused, naming it,
    before anything loads."""
    from .checks import SettingsError
    if not output and not resume:
        raise click.UsageError("give --output RUN for a new search, or --resume RUN")
    if not resume:
        return False
    ctx = click.get_current_context()
    typed = [p for p in ctx.command.params
             if p.name not in ("resume", "quiet") and ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE]
    for p in typed:
        if p.name not in _RESUME_OPTIONS:
            allowed = ", ".join(q.opts[0] for q in ctx.command.params if q.name in _RESUME_OPTIONS)
            raise SettingsError(f"{p.opts[0]} cannot be given with --resume: a run keeps the settings it started "
                                f"with (its config.json); only {allowed} may be given")
    overrides = {_RESUME_OPTIONS[p.name]: ctx.params[p.name] for p in typed}
    run_fn(resume=resume, overrides=overrides, log=log, quiet=quiet)
    return True


def _tuple(text, cast=str, option=""):
    """'a,b,c' -> a tuple of `cast` values; a usage error (exit 2) names the option otherwise."""
    try:
        return tuple(cast(x.strip()) for x in text.split(",") if x.strip()) if text else ()
    except ValueError:
        kind = {int: "whole numbers", float: "numbers"}.get(cast, "values")
        raise click.UsageError(f"{option} must be comma-separated {kind}, got {text!r}") from None


@main.command()
@click.option("--model", default=None, help="HF id or folder; default: bundled SmolLM2-135M.")
@click.option("--output", default=None, help="Run folder (config, logs, checkpoints, hall of fame, plot).")
@click.option("--resume", default=None, help="Continue the run in this folder where it stopped.")
@click.option("--sparsity", type=float, default=None, help="Fraction pruned: default 0.5; N/M with --structure N:M.")
@click.option("--structure", default="unstructured", show_default=True, help="unstructured, 2:4, 4:8")
@click.option("--strategy", type=click.Choice(["evolution", "random"]), default="evolution", show_default=True,
              help="evolution (genetic programming) or random search, as a control.")
@click.option("--population", default=20, show_default=True, help="Metric trees per generation.")
@click.option("--generations", default=15, show_default=True, help="With --resume: extend the run to this many.")
@click.option("--elite", default=2, show_default=True, help="Best trees copied unchanged into the next generation.")
@click.option("--tournament", default=3, show_default=True, help="Trees drawn per parent-selection tournament.")
@click.option("--stages", default="1,4,16", show_default=True,
              help="Search chunks seen at each evaluation stage (the last is the whole search set).")
@click.option("--promote", default=0.25, show_default=True, help="Fraction of a stage promoted to the next.")
@click.option("--screen-tokens", type=int, default=None,
              help="The first stage scores only the first N tokens of each of its chunks: a cheaper screen "
                   "(256 halves its forward pass); check how it ranks with --stage-check.")
@click.option("--heldout-chunks", default=64, show_default=True,
              help="WikiText-2 chunks, never searched on, that re-score the hall of fame at the end.")
@click.option("--heldout-full", is_flag=True, help="Also re-evaluate on the whole test split at the end.")
@click.option("--baselines", default="magnitude,wanda,obs,pruner-zero", show_default=True,
              help="Catalog metrics measured beside the search (search and held-out perplexity); 'none' for none.")
@click.option("--seed-metrics", default="", help="Catalog metrics in the first population, e.g. wanda,magnitude.")
@click.option("--terminals", default=None, help="Override the search terminals, e.g. W,X,G.")
@click.option("--nsamples", default=32, show_default=True, help="Calibration windows (of --seqlen tokens).")
@click.option("--seqlen", default=512, show_default=True, help="Tokens per calibration window and evaluation chunk.")
@click.option("--calibration", default="wikipedia", show_default=True, help="wikipedia, wikitext2 or a text file.")
@click.option("--search-data", default=None,
              help="Search text (default WikiText-2 test); wikipedia-heldout: search on held-out Wikipedia "
                   "and report on WikiText-2.")
@click.option("--update", default="none", show_default=True,
              help="Search recipes: each candidate's kept weights reconstructed (a kind, with parameters if "
                   "wanted, as for apply).")
@click.option("--proxy-stages", default=1, show_default=True,
              help="With --update: leading stages ranked by the mask alone, a cheap proxy.")
@click.option("--search", "search_parts", default="metric", show_default=True,
              help="The parts of a candidate that evolve, comma-separated: metric (the tree), update (the "
                   "reconstruction's settings, starting from --update's: rho, iterations, mask schedule, damping, "
                   "refinement, error correction), allocation (a sparsity per block and layer kind, the total "
                   "exact; unstructured only). A part left out stays as given (the metric: the first "
                   "--seed-metrics).")
@click.option("--fixed-settings", default="",
              help="With --search update: update settings kept as --update gives them while the others evolve, "
                   "comma-separated (e.g. percdamp,iters).")
@click.option("--fast-track", is_flag=True,
              help="With --search update: candidates that keep the mask of a hall-of-fame recipe and change only "
                   "its update skip the mask-only stages' ranking (it can only repeat that mask's verdict) and go "
                   "on to be judged with their update, as many as the ranking promotes.")
@click.option("--fitness", type=click.Choice(["one-shot", "sequential"]), default=None,
              help="How the last stage prunes its candidates: sequential, as apply prunes them (block by block "
                   "through the pruned earlier blocks; the faithful fitness, a whole prune per candidate) or "
                   "one-shot (every layer from the dense model's statistics, cheap). Default: sequential with "
                   "--update, else one-shot.")
@click.option("--fitness-samples", type=int, default=None,
              help="Calibration windows of the sequential stage (default --nsamples): fewer is cheaper.")
@click.option("--stage-check", default=0, show_default=True,
              help="Before generation 0, score this many varied candidates on every stage and write how each "
                   "stage ranks like the last (Spearman) to RUN/stage_check.json; 20 or more to mean much.")
@click.option("--data-dir", default=None, envvar="PRUNERZERO_DATA_DIR",
              help="Folder holding wikitext-2-raw/wiki.test.raw.")
@_bos_option()
@click.option("--seed", default=0, show_default=True, help="Seed of the calibration draw and of every random choice.")
@click.option("--time-limit", type=float, default=None,
              help="Seconds for the whole run (set-up, generations and the final held-out scoring, estimated); "
                   "generations stop when the next would pass it. With --resume: a new limit for this call.")
@_pool_options
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="auto: the checkpoint's own dtype (fp16 runs as bf16 on a CPU)")
@click.option("--device", default="auto", show_default=True, help="auto picks CUDA when present.")
@click.option("--quiet", is_flag=True, help="No live lines or progress bars; the run folder has the logs.")
def evolve(model, output, resume, sparsity, structure, strategy, population, generations, elite, tournament, stages,
           promote, screen_tokens, heldout_chunks, heldout_full, baselines, seed_metrics, terminals, nsamples, seqlen, calibration, search_data,
           update, proxy_stages, search_parts, fixed_settings, fast_track, fitness, fitness_samples, stage_check, data_dir, bos, seed, time_limit, workers, threads,
           use_ray, ray_address, gpus_per_worker, dtype, device, quiet):
    """Search for a pruning metric by genetic programming (Pruner-Zero)."""
    from .search.config import SearchConfig
    from .search.run import run_evolve
    log = _log(quiet)
    _on_interrupt(_resume_hint("evolve", resume or output, "the primitives"))
    if _resumed(run_evolve, output, resume, log, quiet):
        return
    cfg = SearchConfig(model=model, sparsity=sparsity, structure=structure, strategy=strategy, population=population,
                       generations=generations, elite=elite, tournament=tournament, stages=_tuple(stages, int, "--stages"),
                       promote=promote, screen_tokens=screen_tokens, heldout_chunks=heldout_chunks,
                       heldout_full=heldout_full,
                       baselines=() if baselines.strip() == "none" else _tuple(baselines),
                       seed_metrics=_tuple(seed_metrics), terminals=_tuple(terminals) or None, nsamples=nsamples,
                       seqlen=seqlen, calibration=calibration, search_data=search_data, update=update,
                       proxy_stages=proxy_stages, search=_tuple(search_parts), fitness=fitness, fitness_samples=fitness_samples,
                       fixed_settings=_tuple(fixed_settings), fast_track=fast_track,
                       stage_check=stage_check, data_dir=data_dir, bos=bos, seed=seed, time_limit=time_limit,
                       workers=workers, threads=threads, ray=use_ray, ray_address=ray_address,
                       gpus_per_worker=gpus_per_worker, dtype=dtype, device=device)
    run_evolve(cfg, output, log=log, quiet=quiet)


@main.command()
@click.option("--model", default=None, help="HF id or folder; default: bundled SmolLM2-135M.")
@click.option("--output", default=None, help="Run folder (config, log, checkpoint, database link, model, report).")
@click.option("--resume", default=None, help="Continue the run in this folder where it stopped.")
@click.option("--target-params", "target", default=0.6, show_default=True,
              help="Prunable parameters kept: a fraction in (0, 1] or an absolute count.")
@click.option("--generations", default=10, show_default=True, help="With --resume: extend the run to this many.")
@click.option("--offspring", default=8, show_default=True, help="Children of the parent each generation.")
@click.option("--stages", default="512:1024:4,1024:2048:2,2048:4096:1", show_default=True,
              help="Selection stages as train tokens:scoring tokens:survivors.")
@click.option("--lr", default=1e-5, show_default=True, help="Learning rate of the light training in selection.")
@click.option("--ladder", default=None, help="Removed fractions per module, e.g. 0,0.25,0.5,0.75,1 (default tenths).")
@click.option("--multiple", default=8, show_default=True, help="MLP channel counts are multiples of this.")
@click.option("--database", default=None, help="Level database folder (default: the cache, keyed by settings).")
@click.option("--finetune-tokens", default=0, show_default=True, help="Post-train the final models on this many tokens.")
@click.option("--finetune-lr", default=1e-5, show_default=True,
              help="AdamW learning rate of --finetune-tokens post-training.")
@click.option("--no-baselines", is_flag=True, help="Skip the uniform and per-layer-error models.")
@click.option("--nsamples", default=32, show_default=True, help="Calibration windows (of --seqlen tokens).")
@click.option("--seqlen", default=512, show_default=True, help="Tokens per calibration window and evaluation chunk.")
@click.option("--calibration", default="wikipedia", show_default=True, help="wikipedia, wikitext2 or a text file.")
@click.option("--eval-data", default=None, help="Perplexity text (default WikiText-2 test).")
@click.option("--eval-chunks", type=int, default=64, show_default=True, help="Perplexity on the first K chunks.")
@click.option("--eval-full", is_flag=True, help="Also perplexity on the whole split (slow on a CPU).")
@click.option("--data-dir", default=None, envvar="PRUNERZERO_DATA_DIR",
              help="Folder holding wikitext-2-raw/wiki.test.raw.")
@_bos_option()
@click.option("--seed", default=0, show_default=True, help="Seed of the calibration draw and of every random choice.")
@click.option("--time-limit", type=float, default=None, help="Seconds; stop after the generation that passes it. With --resume: a new total.")
@_pool_options
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="auto: the checkpoint's own dtype (fp16 runs as bf16 on a CPU)")
@click.option("--device", default="auto", show_default=True, help="auto picks CUDA when present.")
@click.option("--quiet", is_flag=True, help="No live lines or progress bars; the run folder has the logs.")
@click.option("--quick", is_flag=True,
              help="A first look in minutes: 8 calibration windows, 3 generations of 4, stages 256:512:2,512:1024:1, "
                   "16 evaluation chunks (options given explicitly win).")
@_task_options("--eval-tasks")
def darwin(model, output, resume, target, generations, offspring, stages, lr, ladder, multiple, database,
           finetune_tokens, finetune_lr, no_baselines, nsamples, seqlen, calibration, eval_data, eval_chunks,
           eval_full, data_dir, bos, seed, time_limit, workers, threads, use_ray, ray_address, gpus_per_worker, dtype,
           device, quiet, quick, tasks, num_fewshot, task_batch_size, task_limit, include_path):
    """Evolve per-layer head and channel counts (DarwinLM) into a smaller, faster dense model."""
    from .structured.config import QUICK, DarwinConfig, parse_stages
    from .structured.database import DEFAULT_LADDER
    from .structured.run import run_darwin
    log = _log(quiet)
    _on_interrupt(_resume_hint("darwin", resume or output, "the database levels"))
    if _resumed(run_darwin, output, resume, log, quiet):
        return
    settings = dict(model=model, target=target, generations=generations, offspring=offspring,
                    stages=parse_stages(stages), lr=lr, ladder=_tuple(ladder, float, "--ladder") or DEFAULT_LADDER,
                    multiple=multiple, database=database, finetune_tokens=finetune_tokens,
                    finetune_lr=finetune_lr, baselines=not no_baselines, nsamples=nsamples, seqlen=seqlen,
                    calibration=calibration, eval_data=eval_data, eval_chunks=eval_chunks, eval_full=eval_full,
                    data_dir=data_dir, bos=bos, seed=seed, time_limit=time_limit, threads=threads, workers=workers,
                    ray=use_ray, ray_address=ray_address, gpus_per_worker=gpus_per_worker, dtype=dtype,
                    device=device, tasks=tasks, num_fewshot=num_fewshot, task_batch_size=task_batch_size,
                    task_limit=task_limit, include_path=include_path)
    if quick:
        ctx = click.get_current_context()
        settings.update({k: v for k, v in QUICK.items()
                         if k not in ctx.params or ctx.get_parameter_source(k) is ParameterSource.DEFAULT})
    run_darwin(DarwinConfig(**settings), output, log=log, quiet=quiet)


@main.command("eval")
@_common
@_task_options("--tasks")
@click.option("--quiet", is_flag=True, help="No progress bars or step lines; the results only.")
def eval_(model, dtype, device, seqlen, eval_data, eval_chunks, data_dir, bos, tasks, num_fewshot, task_batch_size,
          task_limit, include_path, quiet):
    """Print a model's perplexity (SparseGPT/Wanda protocol) and, with --tasks, its zero-shot accuracies."""
    from .apply_config import EvalConfig
    from .pipeline import run_eval
    cfg = EvalConfig(model=model, seqlen=seqlen, eval_data=eval_data, eval_chunks=eval_chunks, data_dir=data_dir,
                     bos=bos, dtype=dtype, device=device, tasks=tasks, num_fewshot=num_fewshot,
                     task_batch_size=task_batch_size, task_limit=task_limit, include_path=include_path)
    ppl = run_eval(cfg, log=_log(quiet))
    click.echo(f"perplexity: {ppl:.3f}")


if __name__ == "__main__":
    main()
