"""Walking a model's decoder blocks one at a time on calibration activations: what
sequential pruning and block-by-block statistics share. Only one block's statistics are
held at a time, so a 7B model's Hessians need not all fit in memory."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from ..progress import bar

from .models import ONLOAD_ATTR, decoder_layers, prunable_linears
from .passes import block_batch, feed, run_block, run_paired, stopping_at
from .stages import last_layer, staged_block


class _Captured(Exception):
    """Ends block_inputs' capture pass once a block's arguments are had."""


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
                raise _Captured
        return hook

    handles = [b.register_forward_pre_hook(grab(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with replaced_forwards(blocks, lambda i: pass_through):
            for i in range(len(samples)):
                try:
                    model(samples[i:i + 1].to(device), use_cache=False)
                except _Captured:
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


def blockwise(model, calibration, recorder, prune_block, progress, desc="pruning blocks", dense: bool = False,
              batch: int | None = None, paired: bool = False, staged: bool = False, tune=None,
              dense_windows: int = 0):
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
    already-pruned stages give it, as SparseGPT's "true sequential" option does. tune: called
    as tune(block, linears, inputs, dense_outputs, call) once a block is pruned, before
    its outputs are passed on (tuning.tune_block); sequential pruning then carries the dense
    stream too, for the dense block's outputs. dense_windows: carry that stream for the first
    dense_windows calibration samples only (rounded up to whole batches; 0: all): a paired
    recorder estimates the rest (PairedHessians.cross) and tuning fits those samples."""
    inputs, calls = block_inputs(model, calibration)
    blocks = decoder_layers(model)
    dtype, device = compute_dtype(model), execution_device(model)
    originals = None
    if (paired or tune is not None) and not dense:
        if dense_windows:   # whole batches, so that the dense stream's line up with the pruned stream's
            batch = batch or block_batch(inputs, device)
            originals = list(inputs[:-(-dense_windows // batch) * batch])
        else:
            originals = list(inputs)
    known: dict = {}
    for i, block in enumerate(bar(blocks, desc=desc, enabled=progress)):
        inputs, call = as_dtype(inputs, calls[i], dtype, device)
        with running_in(block, dtype, device):
            linears = prunable_linears(block)
            dense_in = None if originals is None else as_dtype(originals, call, dtype, device)[0]
            if dense_in is not None and not paired:   # the dense outputs, for tuning alone
                with torch.no_grad():
                    originals = run_block(block, dense_in, call, batch)
            if staged and not dense:
                outputs, passed_on = staged_block(i, block, linears, inputs, dense_in if paired else None, call,
                                                  batch, recorder, prune_block)
                originals = passed_on if paired else originals
            else:
                outputs, originals = _prune_unstaged(i, block, linears, inputs, dense_in, call, batch, recorder,
                                                     prune_block, dense, paired, originals, known)
            if tune is not None:
                targets = outputs[:dense_windows or None] if dense else originals
                tune(block, linears, inputs, targets, call)
                if not dense:   # the tuned block's outputs are what the next block receives
                    outputs = None
            if outputs is None:
                with torch.no_grad():
                    outputs = run_block(block, inputs, call, batch)
            inputs = outputs


def _prune_unstaged(i, block, linears, inputs, dense_in, call, batch, recorder, prune_block, dense, paired,
                    originals, known):
    """blockwise's step for a block pruned at once: (the outputs to pass on when already had, the
    dense stream's outputs). dense: the block's outputs before pruning; else None (the pruned
    block runs again for them). The recording pass of a sequential walk drops its own outputs:
    it stops at the block's last layer."""
    stop = [] if dense else last_layer(block, linears, inputs[0], call, known)
    outputs = None
    with torch.no_grad(), recorder(linears) as rec:
        if dense:
            outputs = run_block(block, inputs, call, batch)
        elif paired:
            originals = run_paired(block, dense_in, inputs, call, batch, rec, stop=stop)
        else:
            with stopping_at(stop):
                feed(block, inputs, call, batch)
    prune_block(i, linears, rec)
    return outputs, originals
