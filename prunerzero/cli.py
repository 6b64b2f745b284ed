"""Command line: `prunerzero --help`."""
from __future__ import annotations

import sys

import click

from .errors import PrunerZeroError


class _Group(click.Group):
    """Turns prunerzero's own errors into one clear line and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (PrunerZeroError, FileExistsError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="prunerzero")
def main():
    """Evolve symbolic pruning metrics for LLMs, and prune with them."""


@main.command()
@click.argument("expr")
def simplify(expr):
    """Show EXPR (metric text or catalog name) parsed, OOS-simplified, and its ranking key."""
    from .metric import Metric
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
    from .metric import Metric
    from .space import load_space
    space = load_space()
    for name, entry in space.catalog.items():
        m = Metric.parse(name)
        click.echo(f"{name:12} {m.simplify()}")
        click.echo(f"{'':12} canonical {m.canonical()}  -- {entry.source}")
    if operators:
        click.echo("\nterminals:")
        for t in space.terminals.values():
            click.echo(f"  {t.name:8} {t.shape:7} {t.sign:12} {t.doc}")
        click.echo("operators:")
        for o in space.operators.values():
            click.echo(f"  {o.name:8} arity {o.arity}  {o.doc}")


def _common(f):
    opts = [
        click.option("--model", default=None, help="HF id or folder; default: bundled SmolLM2-135M."),
        click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True),
        click.option("--device", default="auto", show_default=True, help="auto picks CUDA when present."),
        click.option("--seqlen", default=512, show_default=True),
        click.option("--eval-data", default=None, help="wikitext2 (default), wikipedia, or a text file."),
        click.option("--eval-chunks", type=int, default=None, help="Use the first K chunks (default: all)."),
        click.option("--data-dir", default=None, envvar="PRUNERZERO_DATA_DIR",
                     help="Folder holding wikitext-2-raw/wiki.test.raw."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@main.command()
@_common
@click.option("--metric", default="pruner-zero", show_default=True, help="Metric text or catalog name.")
@click.option("--sparsity", default=0.5, show_default=True)
@click.option("--structure", default="unstructured", show_default=True, help="unstructured, 2:4, 4:8, ...")
@click.option("--output", default=None, help="Folder for the pruned model and report.json.")
@click.option("--nsamples", default=32, show_default=True)
@click.option("--calibration", default="wikipedia", show_default=True, help="wikipedia, wikitext2 or a text file.")
@click.option("--seed", default=0, show_default=True)
@click.option("--one-shot", is_flag=True, help="Score every layer from the dense model's activations.")
@click.option("--method", type=click.Choice(["metric", "sparsegpt"]), default="metric", show_default=True,
              help="sparsegpt: second-order reconstruction instead of a metric (--metric is ignored).")
def apply(model, dtype, device, seqlen, eval_data, eval_chunks, data_dir, metric, sparsity, structure, output,
          nsamples, calibration, seed, one_shot, method):
    """Prune a model with a metric (or SparseGPT), report perplexity, and save it."""
    from .pipeline import run_apply
    run_apply(model, metric, sparsity, structure, output, nsamples, seqlen, calibration, eval_data, eval_chunks,
              seed, not one_shot, dtype, device, data_dir, method=method, log=click.echo)


@main.command("eval")
@_common
def eval_(model, dtype, device, seqlen, eval_data, eval_chunks, data_dir):
    """Print a model's perplexity (SparseGPT/Wanda protocol)."""
    from .pipeline import run_eval
    ppl = run_eval(model, eval_data, seqlen, eval_chunks, dtype, device, data_dir, log=click.echo)
    click.echo(f"perplexity: {ppl:.3f}")


if __name__ == "__main__":
    main()
