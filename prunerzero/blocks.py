"""Walking a model's decoder blocks one at a time on calibration activations: what
sequential pruning and block-by-block statistics share. Only one block's statistics are
held at a time, so a 7B model's Hessians need not all fit in memory."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .models import decoder_layers, prunable_linears


class _Stop(Exception):
    pass


@torch.no_grad()
def block_inputs(model, samples: torch.Tensor):
    """Hidden states entering the first decoder block for each sample, and its call kwargs."""
    first = decoder_layers(model)[0]
    device = next(model.parameters()).device
    inputs, call = [], {}

    def grab(module, args, kwargs):
        inputs.append(args[0] if args else kwargs.pop("hidden_states"))
        call.update(kwargs)
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(len(samples)):
            try:
                model(samples[i:i + 1].to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return inputs, call


def run_block(block, inputs, call):
    outs = []
    for x in inputs:
        y = block(x, **call)
        outs.append(y[0] if isinstance(y, tuple) else y)
    return outs


def blockwise(model, calibration, recorder, prune_block, progress, desc="pruning blocks"):
    """Sequential pruning: record each block's inputs statistics with `recorder`, prune it with
    `prune_block(index, linears, recorder)`, and pass the calibration activations through the
    pruned block to the next one."""
    inputs, call = block_inputs(model, calibration)
    blocks = decoder_layers(model)
    for i, block in enumerate(tqdm(blocks, desc=desc, disable=not progress, leave=False)):
        linears = prunable_linears(block)
        with torch.no_grad(), recorder(linears) as rec:
            run_block(block, inputs, call)
        prune_block(i, linears, rec)
        with torch.no_grad():
            inputs = run_block(block, inputs, call)
