"""One decoder block run on calibration activations, sample batches at a time: its outputs, a
pass kept only for the hooks it fires (and stopped at a given layer), and the paired pass of the
dense and the pruned streams that error correction records. What the block-by-block walk
(blocks.py) and the staged walks (stages.py) share."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from .layers import matrix


class _Stop(Exception):
    """Ends a pass where stopping_at says (feed catches it)."""


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


def block_batch(inputs, device: torch.device | None = None) -> int:
    """samples_per_call for a block's inputs (a list of (1, tokens, hidden) tensors), run on
    `device` (None: where the inputs are)."""
    return samples_per_call(device or inputs[0].device, inputs[0].shape[-2]) if inputs else 1


def run_block(block, inputs, call, batch: int | None = None):
    """The block's outputs for each input (a list of (1, tokens, hidden) tensors, one per sample),
    called with that block's own (args, kwargs), `batch` samples a call (None: block_batch).
    The call arguments come from a one-sample pass; rotary tables and masks broadcast over the
    batch, so a batched call computes each sample's output as a call of its own would."""
    outs = []
    for x in batched(inputs, batch):
        outs.extend(block_output(block, x, call).split(1))
    return outs


def block_output(block, x, call) -> torch.Tensor:
    """The block's hidden states for one batch `x`, called with its (args, kwargs) (decoder
    blocks of some families return a tuple whose first item they are)."""
    args, kwargs = call
    y = block(x, *args, **kwargs)
    return y[0] if isinstance(y, tuple) else y


def batched(inputs, batch: int | None):
    """The inputs `batch` samples at a time (None: block_batch), each batch one tensor."""
    batch = batch or block_batch(inputs)
    for i in range(0, len(inputs), batch):
        yield inputs[i] if batch == 1 else torch.cat(inputs[i:i + batch])


def feed(block, inputs, call, batch: int | None = None) -> None:
    """run_block for its hooks only: outputs dropped, a pass stopped by stopping_at ends there."""
    args, kwargs = call
    for x in batched(inputs, batch):
        try:
            block(x, *args, **kwargs)
        except _Stop:
            pass


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


def run_paired(block, originals, inputs, call, batch, rec, run=run_block, dense_weights=nullcontext, stop=()):
    """The block's outputs on the dense stream `originals`, each batch of which runs just before
    the same batch of `inputs` (the pruned stream, run by feed for its hooks only and stopped
    at the layers `stop`), so that `rec` sees a layer's dense input and then its pruned input
    on the same tokens. run: how a dense batch is run (feed: for the hooks only, outputs not
    kept); dense_weights: a context the dense batches run in. `originals` may cover only the
    first batches of `inputs` (Update.dense_windows): the later ones run alone."""
    outs = []
    batch = batch or block_batch(inputs)

    def dense_half(b, i, j):
        with dense_weights():
            outs.extend(run(block, originals[i:j], call, batch) or [])
    paired_batches(block, inputs, call, batch, rec, dense_half, stop, dense_batches=-(-len(originals) // batch))
    return outs


def paired_batches(block, inputs, call, batch, rec, dense_half, stop=(), dense_batches: int | None = None):
    """The walk run_paired and replay_paired share: for each batch b of `inputs` (samples i to j),
    dense_half(b, i, j) with `rec` capturing, then the pruned batch through feed (stopped at
    `stop`) for rec to meet it. Batches from `dense_batches` on (None: none) have no dense half:
    rec.alone() takes their pruned inputs."""
    batch = batch or block_batch(inputs)
    for b, i in enumerate(range(0, len(inputs), batch)):
        if dense_batches is None or b < dense_batches:
            rec.capture()
            dense_half(b, i, i + batch)
            rec.capturing = False
        else:
            rec.alone()
        with stopping_at(stop):
            feed(block, inputs[i:i + batch], call, batch)
    rec.settle()


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
