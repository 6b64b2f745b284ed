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
        except PrunerZeroError as e:
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


if __name__ == "__main__":
    main()
