"""Staged blocks (Update.staged=1): a block's layers pruned in the order its forward reaches
them, stage by stage, each stage's statistics recorded on the inputs that the pruned earlier
stages give it. In lockstep (one pass of the pruned stream, every batch halted before each
stage) where the block allows it, else a pass per stage; with error correction the dense
stream's inputs kept from its one pass where they fit."""
from __future__ import annotations

import re

import torch

from .layers import matrix
from .lockstep import Lockstep
from .passes import (batched, block_output, paired_batches, block_batch, feed, run_block, run_paired, stopping_at,
                     swapped_in)


def layer_stages(block, linears: dict, sample, call) -> tuple[list[list[str]], list[str]]:
    """The block's prunable layers in stages, in the order its forward reaches them (found on one
    sample): layers that read one input (q/k/v, gate/up) share a stage, and so do the experts'
    like projections of an MoE layer (their names differ only in the expert's index), so a
    Llama block has four stages: q/k/v, o, gate/up, down. A layer that sample never reached (an
    expert no token of it was routed to) joins the stage of its like layers, or the last.
    Also returns the order the layers ran in on that sample."""
    order, last = [], [None]

    def seen(name):
        def hook(module, inputs, output):
            shared = inputs[0] is last[0]
            last[0] = inputs[0]
            order.append((name, shared))
        return hook
    handles = [m.register_forward_hook(seen(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            run_block(block, [sample], call, 1)
    finally:
        for h in handles:
            h.remove()
    key_of, stages = {}, {}
    for j, (name, shared) in enumerate(order):
        if name not in key_of:
            key_of[name] = key_of[order[j - 1][0]] if shared else _like(name)
            stages.setdefault(key_of[name], []).append(name)
    groups = list(stages.values()) or [[]]
    for name in linears:
        if name not in key_of:
            like = stages.get(_like(name))
            (like if like is not None else groups[-1]).append(name)
    return groups, [name for name, _ in order]


def last_layer(block, linears: dict, sample, call, known: dict) -> list:
    """[the layer the block's forward reaches last], where a recording pass may stop (its
    recorder's pre-hook has run by then): found once for each set of layer names (`known`
    keeps them), on one sample. Empty, so the pass runs whole, when that sample did not reach
    every layer exactly once, or the last is an MoE expert (which experts run, and in which
    order, depends on the tokens)."""
    key = tuple(linears)
    if key not in known:
        known[key] = _final(layer_stages(block, linears, sample, call)[1], len(linears))
    return [] if known[key] is None else [linears[known[key]]]


def _final(order: list[str], layers: int) -> str | None:
    """The last layer of `order` (the discovery sample's), or None when that sample did not run
    each of the block's `layers` exactly once or the last is an MoE expert."""
    once = len(order) == len(set(order)) == layers > 0
    return order[-1] if once and _like(order[-1]) == order[-1] else None


def _stops(stages, k, order) -> list[str]:
    """The layers where stage k's recording pass may stop: those of later stages that ran after
    every layer of stage k on the discovery sample, experts excepted (the layers of an MoE
    layer's experts run interleaved, gate and down of one expert before the next expert's, and
    which experts run depends on the tokens); for the last stage, its own last layer (see
    last_layer)."""
    ran = {name: j for j, name in enumerate(order)}
    end = max((ran[n] for n in stages[k] if n in ran), default=len(order))
    later = [n for s in stages[k + 1:] for n in s if ran.get(n, -1) > end and _like(n) == n]
    final = _final(order, sum(map(len, stages))) if k == len(stages) - 1 else None
    return later + ([final] if final in stages[k] else [])


def _like(name: str) -> str:
    """A layer's name with any expert index made a wildcard: an MoE layer's experts are alike."""
    return re.sub(r"\.\d+\.", ".*.", name)


# The most bytes of the dense stream's layer inputs that a staged, paired block keeps from its
# one dense pass (they replay each stage's dense half instead of a pass of its own). SmolLM2-135M
# from 32 x 512 tokens keeps about 215 MB; a 7B model from 128 x 2048 would need about 12 GB, so
# there the stages run their dense halves as before.
DENSE_STORE_BYTES = 2 << 30


@torch.no_grad()
def staged_block(i, block, linears, inputs, originals, call, batch, recorder, prune_block):
    """blockwise's step for a staged walk: the block pruned in stages, and the inputs of the next
    block from it (with the dense stream's, when `originals` is given, from it before pruning)."""
    passed_on, stored = None, None
    if originals is not None:
        passed_on, stored = run_storing(block, linears, originals, call, batch)
    stages, order = layer_stages(block, linears, inputs[0], call)
    if (originals is None or stored is not None) and in_lockstep(stages, order, linears, inputs):
        return prune_in_lockstep(i, block, linears, stages, inputs, call, batch, recorder, prune_block,
                                 stored), passed_on
    prune_in_stages(i, block, linears, stages, order, inputs, call, batch, recorder, prune_block, originals,
                    stored)
    return run_block(block, inputs, call, batch), passed_on


# The most bytes of stage inputs that a lockstep walk (prune_in_lockstep) may hold at one stop:
# every batch keeps its place in the forward there. Past it the stages run as passes of their own.
LOCKSTEP_BYTES = 2 << 30


def in_lockstep(stages, order, linears, inputs) -> bool:
    """Whether a staged block can be pruned in lockstep: its discovery sample ran every layer
    once, no layer is an MoE expert (which experts run depends on the tokens, so the batches
    would not stop at the same layers), each stage's layers read one input in a row, and the
    stage inputs of all batches at once fit LOCKSTEP_BYTES."""
    if _final(order, len(linears)) is None or any(_like(n) != n for n in linears):
        return False
    at = {name: j for j, name in enumerate(order)}
    if any(at[s[-1]] - at[s[0]] != len(s) - 1 for s in stages):
        return False
    tokens = sum(x.shape[:-1].numel() for x in inputs)
    width = max(matrix(linears[s[0]]).shape[1] for s in stages)
    return 2 * tokens * width * inputs[0].element_size() <= LOCKSTEP_BYTES


def prune_in_lockstep(i, block, linears, stages, inputs, call, batch, recorder, prune_block, stored=None):
    """staged_block's pruned stream in one pass: each batch runs in a lockstep coroutine and halts
    before every stage's first layer; when all have, the stage's recorder sees their inputs (each
    batch's stored dense inputs first when `stored` is given, the paired recorders' dense half),
    batch by batch in order as prune_in_stages' passes would, and the stage is pruned; then every
    batch goes on through it. Returns the pruned block's outputs, so the block runs once on its
    pruned stream instead of once per stage and once more for its outputs."""
    units = [(b, x) for b, x in enumerate(batched(inputs, batch))]
    held: list[dict] = [{} for _ in stages]

    def record_and_prune(k):
        names = stages[k]
        with recorder({n: linears[n] for n in names}) as rec:
            rec.remove()        # fed by hand: its hooks would see each batch as it passes
            for b, x in sorted(held[k].items()):
                if stored is not None and b < len(stored):
                    rec.capture()
                    replay_dense(rec, stored[b], names)
                    rec.capturing = False
                elif stored is not None:   # past the dense stream's windows (Update.dense_windows)
                    rec.alone()
                for name in names:
                    rec.record(name, x)
            if stored is not None:
                rec.settle()
            held[k].clear()
            prune_block(i, {n: linears[n] for n in names}, rec)

    step = Lockstep(record_and_prune)
    first = {stage[0]: k for k, stage in enumerate(stages)}
    outs: dict[int, torch.Tensor] = {}

    def halt(name):
        def hook(module, args):
            held[first[name]][step.current] = args[0]
            step.sync(first[name])
        return hook

    def work(unit, sync):
        b, x = unit
        outs[b] = block_output(block, x, call)
    handles = [linears[name].register_forward_pre_hook(halt(name)) for name in first]
    try:
        step.run(work, units, len(stages))
    finally:
        _remove(handles)
    return [s for b in range(len(units)) for s in outs[b].split(1)]


def run_storing(block, linears, inputs, call, batch, budget: int | None = None):
    """run_block, keeping what each of `linears` received, batch by batch in the order the layers
    ran ([(name, input), ...] per batch; layers that read one tensor keep it once), or None for
    all when that would pass `budget` bytes (DENSE_STORE_BYTES), judged from the first batch."""
    budget = DENSE_STORE_BYTES if budget is None else budget
    batch = batch or block_batch(inputs)
    stored: list | None = []
    current: list = []

    def keep(name):
        def hook(module, args):
            current.append((name, args[0]))
        return hook
    handles = [m.register_forward_pre_hook(keep(n)) for n, m in linears.items()]
    outs = []
    try:
        for i in range(0, len(inputs), batch):
            current = []
            outs.extend(run_block(block, inputs[i:i + batch], call, batch))
            if stored is None:
                continue
            stored.append(current)
            if i == 0 and _bytes(current) * -(-len(inputs) // batch) > budget:
                stored = None   # over budget: the stages run their dense halves as passes
                _remove(handles)
    finally:
        _remove(handles)
    return outs, stored


def _remove(handles: list) -> None:
    """Remove hooks once (the list is emptied)."""
    while handles:
        handles.pop().remove()


def _bytes(pairs) -> int:
    unique = {id(x): x for _, x in pairs}
    return sum(x.numel() * x.element_size() for x in unique.values())


def prune_in_stages(i, block, linears, stages, order, inputs, call, batch, recorder, prune_block, originals=None,
                    stored=None):
    """blockwise's staged step: for each stage of layer_stages, record its layers' statistics on
    the inputs the block gives them now (its earlier stages pruned), each pass stopped where a
    later stage begins, and prune them. With `originals` (the dense stream, paired recorders)
    each batch's dense half comes first: replayed from `stored` (run_storing's, on the dense
    block) when given, else run on the dense weights of the pruned stages, swapped in for it
    (the dense weights of one block are held meanwhile); then the pruned half runs. stages and
    order: the block's layer_stages."""
    dense = {n: matrix(m).clone() for n, m in linears.items()} if originals is not None and stored is None else None
    done: list[str] = []
    for k, names in enumerate(stages):
        part = {n: linears[n] for n in names}
        with torch.no_grad(), recorder(part) as rec, stopping_at([linears[n] for n in _stops(stages, k, order)]):
            if originals is None:
                feed(block, inputs, call, batch)
            elif stored is not None:
                replay_paired(block, stored, set(names), inputs, call, batch, rec)
            else:
                run_paired(block, originals, inputs, call, batch, rec, run=feed,
                           dense_weights=lambda: swapped_in({n: linears[n] for n in done}, dense))
        prune_block(i, part, rec)
        done += names


def replay_paired(block, stored, names: set, inputs, call, batch, rec):
    """run_paired with the dense halves replayed: each batch's stored dense inputs of the layers
    `names`, in the order they ran, then the pruned batch run by feed for its hooks."""
    paired_batches(block, inputs, call, batch, rec, lambda b, i, j: replay_dense(rec, stored[b], names),
                   dense_batches=len(stored))


def replay_dense(rec, stored_batch, names) -> None:
    """One batch's stored dense inputs (run_storing's) of the layers `names`, fed to `rec` in the
    order they ran: a paired recorder's dense half without a pass."""
    for name, x in stored_batch:
        if name in names:
            rec.record(name, x)
