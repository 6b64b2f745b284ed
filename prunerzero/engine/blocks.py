"""Walking a model's decoder blocks one at a time on calibration activations: what
sequential pruning and block-by-block statistics share. Only one block's statistics are
held at a time, so a 7B model's Hessians need not all fit in memory."""
from __future__ import annotations

import re
from contextlib import contextmanager, nullcontext

import torch
from ..progress import bar

from .layers import matrix
from .lockstep import Lockstep
from .models import ONLOAD_ATTR, decoder_layers, prunable_linears


class _Stop(Exception):
    pass


@torch.no_grad()
def block_inputs(model, samples: torch.Tensor):
    """Hidden states entering the first decoder block for each sample, and the call arguments
    of every block (a list, one (args, kwargs) per block).

    Blocks may receive arguments of their own: Gemma-2/3 alternate sliding-window and global
    attention with their own masks and rotary tables, so one block's arguments replayed for
    all would compute a different function. Each block's are captured from one forward pass
    of the first sample; the others stop at block 0. The arguments do not depend on the
    tokens (positions, masks, rotary tables of a given length), so they serve every sample,
    and the blocks pass their input straight through during that pass: no block computes
    anything here (a 7B model held in host memory would otherwise run whole, on the host,
    before the block-by-block work began)."""
    blocks = decoder_layers(model)
    device = next(model.parameters()).device
    inputs, calls = [], [None] * len(blocks)

    def grab(i):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            x = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                inputs.append(x)
            first_pass = calls[-1] is None  # the last block's arguments end the first pass
            if first_pass:
                calls[i] = (tuple(args[1:]), kwargs)
            if i == len(blocks) - 1 or not first_pass:
                raise _Stop
        return hook

    handles = [b.register_forward_pre_hook(grab(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with replaced_forwards(blocks, lambda i: pass_through):
            for i in range(len(samples)):
                try:
                    model(samples[i:i + 1].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return inputs, calls


def pass_through(*args, **kwargs):
    """A block that hands its input on unchanged (its call arguments are all that is wanted)."""
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def replaced_forwards(blocks, make):
    """Inside, block i's forward is make(i) (its hooks still run); the blocks' own on exit."""
    saved = [b.__dict__.get("forward") for b in blocks]
    try:
        for i, b in enumerate(blocks):
            b.forward = make(i)
        yield
    finally:
        for b, f in zip(blocks, saved):
            if f is None:
                del b.forward
            else:
                b.forward = f


def execution_device(model) -> torch.device:
    """Where decoder blocks run: the device load_model chose for block-wise onloading (the
    weights then stay in host memory, see models.place), else where the weights are."""
    return getattr(model, ONLOAD_ATTR, None) or next(model.parameters()).device


def onloading(model) -> bool:
    return getattr(model, ONLOAD_ATTR, None) is not None


def compute_dtype(model) -> torch.dtype | None:
    """The dtype that decoder blocks run in when walked one at a time: None (their own) unless
    the weights are half precision and run on a CPU without half-precision matrix units (AVX2
    and older: bf16 products run about 4x slower than fp32 there). Then each block is upcast to
    fp32 while it runs and stored back in its own dtype after, which is exact for the stored
    weights: the model keeps half the memory, the work runs at fp32 speed."""
    p = next(model.parameters())
    if execution_device(model).type != "cpu" or p.dtype not in (torch.bfloat16, torch.float16):
        return None
    has_units = (torch.ops.mkldnn._is_mkldnn_bf16_supported() if p.dtype == torch.bfloat16
                 else torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return None if has_units else torch.float32


def by_block(model) -> bool:
    """Whether whole-model passes (perplexity, dense statistics) must walk the decoder blocks one
    at a time: the model is onloaded block by block, or its blocks run in another dtype."""
    return onloading(model) or compute_dtype(model) is not None


def _onload(tensors, device: torch.device, dtype: torch.dtype | None) -> list:
    """Move parameters and buffers to `device` (floating parameters also to `dtype`; buffers keep
    theirs: rotary frequencies must not round through bf16) by swapping their .data; returns
    what _offload needs to put them back into their own storage."""
    moved = []
    for t in tensors:
        want = dtype if dtype is not None and isinstance(t, torch.nn.Parameter) and t.is_floating_point() else t.dtype
        if t.device != device or t.dtype != want:
            moved.append((t, t.data))
            t.data = t.data.to(device=device, dtype=want)
    return moved


def _offload(moved: list, write_back: bool) -> None:
    """Undo _onload. write_back copies the values into the original storage (changes made while
    onloaded, such as pruning, persist); the storage itself is kept, so views taken of the
    weights before (the search evaluator's dense weights) stay valid and nothing is reallocated."""
    for t, home in moved:
        if write_back:
            home.copy_(t.data)
        t.data = home


def _tensors(module) -> list:
    return [*module.parameters(), *module.buffers()]


@contextmanager
def running_in(block, dtype: torch.dtype | None, device: torch.device | None = None, write_back: bool = True):
    """Block on `device` in `dtype` inside (None: as it is), back in its own storage on exit,
    with the values it has then (write_back=False: as they were; for callers that undo their
    own changes). Views of its weights (prunable_linears' per-expert views) must be taken
    inside."""
    moved = _onload(_tensors(block), device or next(block.parameters()).device, dtype)
    try:
        yield
    finally:
        _offload(moved, write_back)


@contextmanager
def rest_running_in(model, dtype: torch.dtype | None, device: torch.device):
    """Everything outside the decoder blocks (embeddings, final norm, head, rotary tables) on
    `device` in `dtype` inside, back on exit unchanged: the model's own forward then runs its
    head where the blocks ran."""
    inside = {id(t) for b in decoder_layers(model) for t in _tensors(b)}
    moved = _onload([t for t in _tensors(model) if id(t) not in inside], device, dtype)
    try:
        yield
    finally:
        _offload(moved, write_back=False)


def as_dtype(inputs: list, call, dtype: torch.dtype | None, device: torch.device | None = None):
    """Block inputs and call arguments with their tensors on `device` and floating ones in `dtype`
    (None: unchanged)."""
    if dtype is None and device is None:
        return inputs, call

    def cast(v):
        if isinstance(v, torch.Tensor):
            return v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
        return tuple(cast(t) for t in v) if isinstance(v, tuple) else v
    args, kwargs = call
    return [cast(x) for x in inputs], (cast(args), {k: cast(v) for k, v in kwargs.items()})


# tokens per block call on an accelerator: a 512-token sample leaves most of a GPU idle
GPU_TOKENS_PER_CALL = 8192


def samples_per_call(device: torch.device, tokens: int) -> int:
    """How many samples of `tokens` tokens go through the model (or a block) in one call. One on
    a CPU: at 512 tokens a sample's matrix products already run at the CPU's speed, and larger
    calls measured no faster (2-core CPU, SmolLM2 block, batch 1/4/16: 2.25/2.30/3.26 s per 16
    samples). On an accelerator, enough samples for GPU_TOKENS_PER_CALL tokens."""
    if device.type == "cpu":
        return 1
    return max(1, GPU_TOKENS_PER_CALL // max(1, tokens))


def block_batch(inputs) -> int:
    """samples_per_call for a block's inputs (a list of (1, tokens, hidden) tensors)."""
    return samples_per_call(inputs[0].device, inputs[0].shape[-2]) if inputs else 1


def run_block(block, inputs, call, batch: int | None = None):
    """The block's outputs for each input (a list of (1, tokens, hidden) tensors, one per sample),
    called with that block's own (args, kwargs), `batch` samples a call (None: block_batch).
    The call arguments come from a one-sample pass; rotary tables and masks broadcast over the
    batch, so a batched call computes each sample's output as a call of its own would."""
    args, kwargs = call
    outs = []
    for x in _batched(inputs, batch):
        y = block(x, *args, **kwargs)
        y = y[0] if isinstance(y, tuple) else y
        outs.extend(y.split(1))
    return outs


def _batched(inputs, batch: int | None):
    """The inputs `batch` samples at a time (None: block_batch), each batch one tensor."""
    batch = batch or block_batch(inputs)
    for i in range(0, len(inputs), batch):
        yield inputs[i] if batch == 1 else torch.cat(inputs[i:i + batch])


def blockwise(model, calibration, recorder, prune_block, progress, desc="pruning blocks", dense: bool = False,
              batch: int | None = None, paired: bool = False, staged: bool = False):
    """Sequential pruning: record each block's inputs statistics with `recorder`, prune it with
    `prune_block(index, linears, recorder)`, and pass the calibration activations through the
    pruned block to the next one. dense: pass on the block's outputs from before it was pruned
    instead (one-shot pruning from the dense model's statistics, one block's in memory at a time).
    Each block runs on execution_device(model) (moved there only while it runs when the model is
    onloaded) and in compute_dtype(model) (fp32 for a half-precision model on a CPU without
    half-precision units), so statistics come from fp32 activations there. batch: samples per
    block call (None: block_batch, one on a CPU). paired (sequential only): the dense model's
    activations are carried along too, one more pass per block, and each batch runs on both
    streams in turn for a paired recorder (calibration.PairedHessians). staged (sequential
    only): the block's layers are pruned in the order the forward reaches them, one stage at
    a time (see layer_stages), each stage's statistics recorded on the inputs the block's
    already-pruned stages give it, as SparseGPT's "true sequential" option does."""
    inputs, calls = block_inputs(model, calibration)
    originals = list(inputs) if paired and not dense else None
    blocks = decoder_layers(model)
    dtype, device = compute_dtype(model), execution_device(model)
    known: dict = {}
    for i, block in enumerate(bar(blocks, desc=desc, enabled=progress)):
        inputs, call = as_dtype(inputs, calls[i], dtype, device)
        with running_in(block, dtype, device):
            linears = prunable_linears(block)
            if staged and not dense:
                dense_in = None if originals is None else as_dtype(originals, call, dtype, device)[0]
                inputs, originals = staged_block(i, block, linears, inputs, dense_in, call, batch, recorder,
                                                 prune_block)
                continue
            # the recording pass's own outputs are dropped (sequential): it stops at the last layer
            stop = [] if dense else last_layer(block, linears, inputs[0], call, known)
            with torch.no_grad(), recorder(linears) as rec:
                if dense:
                    outputs = run_block(block, inputs, call, batch)
                elif originals is None:
                    with stopping_at(stop):
                        feed(block, inputs, call, batch)
                else:
                    originals = run_paired(block, as_dtype(originals, call, dtype, device)[0], inputs, call, batch,
                                           rec, stop=stop)
            prune_block(i, linears, rec)
            if dense:
                inputs = outputs
            else:
                with torch.no_grad():
                    inputs = run_block(block, inputs, call, batch)


def run_paired(block, originals, inputs, call, batch, rec, run=run_block, dense_weights=nullcontext, stop=()):
    """The block's outputs on the dense stream `originals`, each batch of which runs just before
    the same batch of `inputs` (the pruned stream, run by feed for its hooks only and stopped
    at the layers `stop`), so that `rec` sees a layer's dense input and then its pruned input
    on the same tokens. run: how a dense batch is run (feed: for the hooks only, outputs not
    kept); dense_weights: a context the dense batches run in."""
    outs = []

    def dense_half(b, i, j):
        with dense_weights():
            outs.extend(run(block, originals[i:j], call, batch) or [])
    _paired_batches(block, inputs, call, batch, rec, dense_half, stop)
    return outs


def _paired_batches(block, inputs, call, batch, rec, dense_half, stop=()):
    """The walk run_paired and replay_paired share: for each batch b of `inputs` (samples i to j),
    dense_half(b, i, j) with `rec` capturing, then the pruned batch through feed (stopped at
    `stop`) for rec to meet it."""
    batch = batch or block_batch(inputs)
    for b, i in enumerate(range(0, len(inputs), batch)):
        rec.capture()
        dense_half(b, i, i + batch)
        rec.capturing = False
        with stopping_at(stop):
            feed(block, inputs[i:i + batch], call, batch)
    rec.settle()


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
    if (originals is None or stored is not None) and in_lockstep(stages, order, linears, inputs, batch):
        return prune_in_lockstep(i, block, linears, stages, inputs, call, batch, recorder, prune_block,
                                 stored), passed_on
    prune_in_stages(i, block, linears, inputs, call, batch, recorder, prune_block, originals, stored,
                    (stages, order))
    return run_block(block, inputs, call, batch), passed_on


# The most bytes of stage inputs that a lockstep walk (prune_in_lockstep) may hold at one stop:
# every batch keeps its place in the forward there. Past it the stages run as passes of their own.
LOCKSTEP_BYTES = 2 << 30


def in_lockstep(stages, order, linears, inputs, batch) -> bool:
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
    units = [(b, x) for b, x in enumerate(_batched(inputs, batch))]
    held: list[dict] = [{} for _ in stages]

    def record_and_prune(k):
        names = stages[k]
        with recorder({n: linears[n] for n in names}) as rec:
            rec.remove()        # fed by hand: its hooks would see each batch as it passes
            for b, x in sorted(held[k].items()):
                if stored is not None:
                    rec.capture()
                    for name, xd in stored[b]:
                        if name in names:
                            rec.record(name, xd)
                    rec.capturing = False
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
        y = block(x, *call[0], **call[1])
        outs[b] = y[0] if isinstance(y, tuple) else y
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


def prune_in_stages(i, block, linears, inputs, call, batch, recorder, prune_block, originals=None, stored=None,
                    found=None):
    """blockwise's staged step: for each stage of layer_stages, record its layers' statistics on
    the inputs the block gives them now (its earlier stages pruned), each pass stopped where a
    later stage begins, and prune them. With `originals` (the dense stream, paired recorders)
    each batch's dense half comes first: replayed from `stored` (run_storing's, on the dense
    block) when given, else run on the dense weights of the pruned stages, swapped in for it
    (the dense weights of one block are held meanwhile); then the pruned half runs. found: the
    block's layer_stages when known."""
    stages, order = found or layer_stages(block, linears, inputs[0], call)
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
    def dense_half(b, i, j):
        for name, x in stored[b]:
            if name in names:
                rec.record(name, x)
    _paired_batches(block, inputs, call, batch, rec, dense_half)


@contextmanager
def stopping_at(layers):
    """Inside, a forward pass that reaches any of `layers` stops there (feed catches it): a stage's
    statistics need the block only up to its own layers."""
    def stop(module, args):
        raise _Stop
    handles = [m.register_forward_pre_hook(stop) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def feed(block, inputs, call, batch: int | None = None) -> None:
    """run_block for its hooks only: outputs dropped, a pass stopped by stopping_at ends there."""
    args, kwargs = call
    for x in _batched(inputs, batch):
        try:
            block(x, *args, **kwargs)
        except _Stop:
            pass


@contextmanager
def swapped_in(layers: dict, weights: dict):
    """Inside, each of `layers` holds weights[name] (copied into its own storage, so expert views
    of fused tensors work too); its own values again on exit."""
    kept = {n: matrix(m).clone() for n, m in layers.items()}
    try:
        for n, m in layers.items():
            matrix(m).copy_(weights[n])
        yield
    finally:
        for n, m in layers.items():
            matrix(m).copy_(kept[n])
