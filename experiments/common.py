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
