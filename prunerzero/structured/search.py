"""The DarwinLM loop: a (1 + lambda) evolution over level genomes with staged,
training-aware selection. Each generation the parent makes `offspring` children by
level-switch mutation; every stage trains each remaining candidate for a few windows,
scores its KL from the dense model on fresh windows, and keeps the best `survivors` (the
parent always goes on: elitism); the best of the last stage is the next parent.

Everything random in generation g (mutations, windows, training) is drawn from seeds made
of (seed, g), so a resumed run repeats exactly what an uninterrupted one would do."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from .. import progress
from ..progress import say

from ..runs.rundir import RunDir
from .config import DarwinConfig
from .fitness import DenseReference
from .genome import Genome, LevelSpace
from .scorer import ScoreTask, score_genome
from .shrink import materialize


@dataclass
class FitnessData:
    reference: DenseReference      # dense hidden states of the scoring windows
    train: torch.Tensor            # windows for light training


def select(scores: dict, keep: int, parent) -> list:
    """The `keep` best candidates by score (ties by order given), plus the parent if it fell out."""
    ranked = sorted(scores, key=lambda c: scores[c])[:keep]
    return ranked if parent in ranked else ranked + [parent]


def evaluations_left(n: int, stages) -> int:
    """Evaluations of a generation when n candidates enter `stages`: each stage scores what the
    one before kept (at most its survivors plus the parent, who rejoins only if it fell out; the
    bar's total is corrected as each stage begins)."""
    total = 0
    for _, _, keep in stages:
        total += n
        n = min(n, keep + 1)
    return total


class DarwinSearch:
    """config: the search settings (DarwinConfig, or any object with its generations, offspring,
    max_switches, reach, stages, seqlen, lr, seed and time_limit); build(genome) -> the model to
    score (default: DarwinLM's structured model from the level database). pool: where a stage's
    candidates are scored (runs/pools.py with darwin's Scorer; None: here, one by one)."""

    def __init__(self, config: DarwinConfig, model, space: LevelSpace, data: FitnessData, run: RunDir,
                 quiet=False, build=None, pool=None):
        self.c, self.model, self.space, self.data, self.run = config, model, space, data, run
        self.quiet, self.pool = quiet, pool
        self.build = build or (lambda genome: materialize(self.model, self.space.db, genome))
        self.gen, self.parent, self.elapsed = 0, None, 0.0
        self.evaluations = 0

    def start(self, genome: Genome):
        self.parent = genome
        self.checkpoint()

    def state(self) -> dict:
        return dict(gen=self.gen, parent=self.parent, elapsed=self.elapsed, evaluations=self.evaluations)

    def restore(self, state: dict):
        self.gen, self.parent = state["gen"], tuple(state["parent"])
        self.elapsed, self.evaluations = state["elapsed"], state["evaluations"]

    def checkpoint(self):
        self.run.save_checkpoint(self.state())

    def children(self, rng: random.Random) -> list[Genome]:
        out, seen = [], {self.parent}
        for _ in range(self.c.offspring * 20):
            if len(out) == self.c.offspring:
                break
            child = self.space.mutate(self.parent, rng, rng.randint(1, self.c.max_switches), self.c.reach)
            if child not in seen:
                seen.add(child)
                out.append(child)
        return out

    def score_all(self, candidates, train_idx, eval_idx, stage: int, bar) -> dict:
        """Every candidate's KL; the seeds depend on (seed, generation, stage, position) only,
        so the pool's workers give what this process would."""
        tasks = [ScoreTask(tuple(g), tuple(train_idx), tuple(eval_idx), hash((self.c.seed, self.gen, stage, k)) % 2**31)
                 for k, g in enumerate(candidates)]
        if self.pool is None:
            out = []
            for t in tasks:
                out.append(score_genome(self.build, self.data.reference, self.data.train, self.c.lr, t))
                bar.update(1)
        else:
            out = self.pool.map(tasks, on_result=lambda _: bar.update(1))
        self.evaluations += len(tasks)
        return dict(zip(candidates, out))

    def step(self):
        t0 = time.perf_counter()
        rng = random.Random(f"{self.c.seed}:{self.gen}")
        candidates = [self.parent] + self.children(rng)
        stages, first_median = [], None
        n_eval, n_train = len(self.data.reference.windows), len(self.data.train)
        bar = progress.bar(total=evaluations_left(len(candidates), self.c.stages), enabled=not self.quiet,
                           desc=f"generation {self.gen}", done_line=False)
        for s, (train_tokens, eval_tokens, keep) in enumerate(self.c.stages):
            bar.total = bar.n + evaluations_left(len(candidates), self.c.stages[s:])
            bar.refresh()
            tr = rng.sample(range(n_train), min(n_train, train_tokens // self.c.seqlen))
            ev = rng.sample(range(n_eval), min(n_eval, -(-eval_tokens // self.c.seqlen)))
            scores = self.score_all(candidates, tr, ev, s, bar)
            if first_median is None:
                first_median = sorted(scores.values())[len(scores) // 2]
            candidates = select(scores, keep, self.parent)
            stages.append(dict(candidates=len(scores), survivors=len(candidates),
                               parent_kl=scores[self.parent], best_kl=min(scores.values())))
        bar.close()
        winner = min(candidates, key=lambda g: scores[g])
        self.elapsed += time.perf_counter() - t0
        record = dict(gen=self.gen, kl=scores[winner], parent_kl=scores[self.parent], median_first_stage=first_median,
                      kept_parent=winner == self.parent, params=self.space.params(winner), stages=stages,
                      evaluations=self.evaluations, wall_s=round(self.elapsed, 2), genome=list(winner))
        self.run.append("log.jsonl", record)
        self.parent, self.gen = winner, self.gen + 1
        if not self.quiet:
            say(f"gen {record['gen']:3d}  KL {record['kl']:.4f}  parent {record['parent_kl']:.4f}  "
                     f"{'kept parent' if record['kept_parent'] else 'new parent'}  "
                     f"{record['evaluations']} evaluations  {self.elapsed:.0f} s")
        return record

    def plot(self):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        log = self.run.read_lines("log.jsonl")
        if not log:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        gens = [r["gen"] for r in log]
        ax.plot(gens, [r["kl"] for r in log], marker="o", label="selected (last stage)")
        ax.plot(gens, [r["median_first_stage"] for r in log], marker=".", alpha=0.6, label="median (first stage)")
        ax.set(xlabel="generation", ylabel="KL(dense || candidate) per token", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.run.path / "fitness.png", dpi=110)
        plt.close(fig)


def run_loop(search: DarwinSearch):
    """Generations until done (or the time limit), with a checkpoint after each."""
    c = search.c
    while search.gen < c.generations:
        search.step()
        search.checkpoint()
        search.plot()
        if c.time_limit and search.elapsed > c.time_limit:
            say(f"time limit {c.time_limit:.0f} s reached after generation {search.gen - 1}")
            break
