"""Does a screen on shortened chunks rank mask-only candidates as whole chunks do, and what does
it save? Two stage checks over the same candidates (the baselines, Wanda, its mutants, random
trees; the check draws them from its own seeded RNG, so both runs score the same list):

    prunerzero evolve --output A --seed-metrics wanda --stages 1,8 --screen-tokens 256 \
        --stage-check 30 --generations 1 --population 2 --elite 1 --baselines magnitude,wanda
    prunerzero evolve --output B (the same without --screen-tokens)
    python experiments/bench_screen.py --screen A --whole B [--pools 1x2,2x1]

For the first stage of each (1 chunk of 256 tokens against 1 chunk of 512) it writes the
Spearman correlation with the shared last stage (8 whole chunks), over every finite candidate
and over the usable ones (fidelity.usable_spearman: last stage within 10x the best, the
near-misses a search must order).
The seconds per candidate are measured here, the two first stages alternated candidate by
candidate in one process (the runs' own times may have shared the machine); then the screen's
throughput through the search's worker pools (--pools WORKERSxTHREADS, e.g. one worker of two
threads against two of one). Writes results/bench_screen.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from common import RESULTS
from prunerzero.search.fidelity import spearman, usable_spearman


def load(run: Path) -> dict:
    return json.loads((run / "stage_check.json").read_text())


def first_stage(check: dict, label: str, seconds: list) -> dict:
    figures = [(c["perplexity"][0], c["perplexity"][-1]) for c in check["candidates"]
               if c["perplexity"][0] is not None and c["perplexity"][-1] is not None]
    good, n_good = usable_spearman(figures)
    return dict(stage=label, candidates=len(figures), spearman=spearman(*zip(*figures)),
                usable=n_good, spearman_usable=good,
                median_s=statistics.median(seconds), per_hour=3600 / statistics.median(seconds))


def timed(config: dict, texts: list) -> dict:
    """Seconds of each candidate on the first stage of each kind (1 chunk, shortened or whole),
    alternated in one in-process evaluator of the run's settings."""
    from prunerzero.search.config import SearchConfig
    from prunerzero.search.evaluator import Task
    from prunerzero.search.run import search_evaluator
    c = SearchConfig(stages=tuple(config["stages"]), screen_tokens=config["screen_tokens"], seed=config["seed"],
                     nsamples=config["nsamples"], seqlen=config["seqlen"], data_dir=config.get("data_dir"))
    ev, data = search_evaluator(c)
    ev.setup.chunks["screen"] = data.search[:, :c.screen_tokens].contiguous()
    ev(Task(texts[0], 0, 1))   # warm-up
    seconds = {"screen": [], "search": []}
    for text in texts:
        for which in seconds:
            seconds[which].append(ev(Task(text, 0, 1, which)).seconds)
    return seconds


def throughput(config: dict, texts: list, workers: int, threads: int) -> float:
    """Screen candidates per hour through a pool of `workers` evaluators of `threads` torch
    threads each (the search's own pools), after a warm-up task per worker."""
    import dataclasses
    import time
    from prunerzero.runs.pools import make_pool
    from prunerzero.search.config import SearchConfig
    from prunerzero.search.evaluator import Evaluator, Task
    from prunerzero.search.run import search_evaluator
    c = SearchConfig(stages=tuple(config["stages"]), screen_tokens=config["screen_tokens"], seed=config["seed"],
                     nsamples=config["nsamples"], seqlen=config["seqlen"], data_dir=config.get("data_dir"))
    ev, data = search_evaluator(c)
    setup = dataclasses.replace(ev.setup, threads=threads,
                                chunks={**ev.setup.chunks, "screen": data.search[:, :c.screen_tokens].contiguous()})
    pool = make_pool(setup, workers, model=ev.model if workers == 1 else None, worker=Evaluator)
    try:
        if workers == 1:
            torch.set_num_threads(threads)
        pool.map([Task(texts[0], 0, 1, "screen")] * workers)
        t0 = time.perf_counter()
        pool.map([Task(t, 0, 1, "screen") for t in texts])
        return len(texts) * 3600 / (time.perf_counter() - t0)
    finally:
        pool.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--screen", required=True, type=Path, help="run folder of the stage check with --screen-tokens")
    ap.add_argument("--whole", required=True, type=Path, help="run folder of the same check on whole chunks")
    ap.add_argument("--out", default=str(RESULTS / "bench_screen"))
    ap.add_argument("--pools", default="1x2,2x1",
                    help="screen throughput through pools of WORKERSxTHREADS (the machine's cores shared)")
    a = ap.parse_args()
    cs, cw = load(a.screen), load(a.whole)
    if [c["metric"] for c in cs["candidates"]] != [c["metric"] for c in cw["candidates"]]:
        raise SystemExit("the two stage checks scored different candidates: run them with the same settings and seed")
    config = json.loads((a.screen / "config.json").read_text())
    seconds = timed(config, [c["metric"] for c in cs["candidates"]])
    rows = [first_stage(cs, f"1 chunk, first {config['screen_tokens']} tokens", seconds["screen"]),
            first_stage(cw, f"1 chunk, {config['seqlen']} tokens", seconds["search"])]
    texts = [c["metric"] for c in cs["candidates"]]
    pools = []
    for spec in a.pools.split(","):
        workers, threads = map(int, spec.split("x"))
        pools.append(dict(workers=workers, threads=threads, per_hour=throughput(config, texts, workers, threads)))
        print(pools[-1], flush=True)
    settings = dict(screen_tokens=config["screen_tokens"], stages=config["stages"], seed=config["seed"],
                    candidates=len(cs["candidates"]), threads=torch.get_num_threads(), machine=platform.machine(),
                    processor=platform.processor(), torch=torch.__version__)
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(dict(settings=settings, rows=rows, pools=pools), indent=2))
    lines = [f"# A shortened first stage against whole chunks ({settings['candidates']} candidates, mask only, "
             f"last stage {config['stages'][-1]} whole chunks; {settings['threads']} threads, torch {torch.__version__})",
             "", "| first stage | Spearman with the last, all finite | usable candidates | Spearman, usable | "
             "s / candidate | candidates / hour |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['stage']} | {r['spearman']:+.3f} ({r['candidates']}) | {r['usable']} | "
              f"{r['spearman_usable']:+.3f} | {r['median_s']:.2f} | {r['per_hour']:,.0f} |" for r in rows]
    lines += ["", f"The screen through the search's worker pools, the same {len(texts)} candidates:", "",
              "| workers x threads | candidates / hour |", "|---|---:|"]
    lines += [f"| {p['workers']} x {p['threads']} | {p['per_hour']:,.0f} |" for p in pools]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
