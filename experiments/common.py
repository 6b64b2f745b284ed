"""What the benchmark scripts share: where results and runs go, and their common options."""
from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def common_options(ap: argparse.ArgumentParser, name: str, runs: bool = True) -> None:
    """--seed, --data-dir, --runs (git-ignored run folders; only where runs=True), --out and --report-only."""
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    if runs:
        ap.add_argument("--runs", default=str(HERE / "runs" / name))
    ap.add_argument("--out", default=str(RESULTS / name))
    ap.add_argument("--report-only", action="store_true", help="Rewrite the markdown and plot from the JSON.")


def figure_row(n: int, width: float = 6, height: float = 4, rows: int = 1):
    """(figure, axes) of n panels side by side (in `rows` rows of n / rows), drawn off-screen; the
    axes flat, row after row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = -(-n // rows)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, axes.ravel()


def save_figure(fig, out) -> None:
    """Lay out, write (110 dpi) and close a matplotlib figure."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def curve_axes(ax, title: str, ylabel: str, xlabel: str = "search time (min)") -> None:
    """Axes of a best-so-far curve (against search time, unless xlabel says what else): plain
    numbers, a grid, a legend."""
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
