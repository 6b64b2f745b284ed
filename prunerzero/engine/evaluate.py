"""Perplexity as SparseGPT and Wanda compute it: non-overlapping chunks scored on their own,
exp of the mean token NLL. Whole-model (nll_sum) or one decoder block at a time for every
chunk (nll_blockwise), which needs only one block's work live and lets a caller change a block
just while it runs (the search's per-block candidate evaluation)."""
from __future__ import annotations

import functools
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from ..progress import bar


@torch.inference_mode()
def nll_sum(model, chunks: torch.Tensor, batch_size: int = 4, progress: bool = True) -> tuple[float, int]:
    """Total next-token NLL over (k, seqlen) token chunks, and the number of tokens scored.
    A model onloaded block by block, or a half-precision model on a CPU without half-precision
    units, is evaluated block by block instead (see blocks.by_block): for the latter, in fp32,
    the same model at fp32 speed."""
    from .blocks import by_block
    if by_block(model):
        return nll_blockwise(model, chunks, progress=progress)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in bar(range(0, len(chunks), batch_size), desc="perplexity", enabled=progress):
        ids = chunks[i:i + batch_size].to(device)
        nll += token_nll(model(ids).logits, ids)
        count += ids[:, 1:].numel()
    return nll, count


def token_nll(logits: torch.Tensor, ids: torch.Tensor, slice_tokens: int = 1024) -> float:
    """Summed next-token NLL of (b, t, vocab) logits against ids, in fp32 whatever the model's
    dtype, a slice of tokens at a time: a bf16 model's logits are never copied whole to fp32
    (4 x 512 tokens of a 128k vocabulary would take 1 GiB, and its log-softmax as much again)."""
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    target = ids[:, 1:].reshape(-1)
    return sum(float(F.cross_entropy(flat[s:s + slice_tokens].float(), target[s:s + slice_tokens], reduction="sum"))
               for s in range(0, len(target), slice_tokens))


def perplexity(model, chunks: torch.Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """Perplexity over (k, seqlen) token chunks: exp(total NLL / (k * (seqlen - 1)))."""
    nll, count = nll_sum(model, chunks, batch_size, progress)
    return math.exp(nll / count)


def perplexities(model, chunks: torch.Tensor, first: int, batch_size: int = 4,
                 progress: bool = True) -> tuple[float, float]:
    """Perplexity on the first `first` chunks and on all of them, from one pass."""
    a, na = nll_sum(model, chunks[:first], batch_size, progress)
    b, nb = nll_sum(model, chunks[first:], batch_size, progress) if len(chunks) > first else (0.0, 0)
    return math.exp(a / na), math.exp((a + b) / (na + nb))


@torch.inference_mode()
def nll_blockwise(model, chunks: torch.Tensor, around_block=None, progress: bool = True) -> tuple[float, int]:
    """nll_sum computed block by block: every chunk through block 0, then all through block 1,
    and so on (as SparseGPT's own evaluation does); chunks go one at a time, so the result equals
    nll_sum(batch_size=1) bit for bit. around_block(i, block), when given, is a context manager
    entered while block i runs: the search evaluator prunes the block in place inside it and
    restores it on exit, so no whole-model copy of weights or masks is ever made."""
    from .passes import run_block
    from .blocks import (as_dtype, block_inputs, compute_dtype, execution_device, rest_running_in,
                         running_in)
    from .models import decoder_layers
    blocks = decoder_layers(model)
    hidden, calls = block_inputs(model, chunks)
    dtype, device = compute_dtype(model), execution_device(model)
    for i, block in enumerate(bar(blocks, desc="perplexity (by block)", enabled=progress)):
        hidden, call = as_dtype(hidden, calls[i], dtype, device)
        # evaluation changes no weight (around_block undoes its own): nothing to write back
        with running_in(block, dtype, device, write_back=False), \
                around_block(i, block) if around_block else nullcontext():
            if i == len(blocks) - 1:
                as_tuple = _returns_tuple(block, hidden[0], call)
            hidden = run_block(block, hidden, call)
    with rest_running_in(model, dtype, device):  # the head runs where and as the blocks ran
        return _head_nll(model, blocks, chunks, hidden, as_tuple)


def _returns_tuple(block, x, call) -> bool:
    """Whether the family's blocks return a tuple (older transformers) or a tensor: a replayed
    block must answer in the same form, or the model would index the wrong thing. One block
    call on one chunk, next to the n_chunks x n_blocks calls of the evaluation."""
    args, kwargs = call
    return isinstance(block(x, *args, **kwargs), tuple)


def _head_nll(model, blocks, chunks, hidden, as_tuple) -> tuple[float, int]:
    """NLL of each chunk from its last-block output: the model's own forward with every block
    replaced by a pass-through and the last handing back the stored output, so the final norm,
    the head and any family-specific logit processing (soft-capping, scaling) are the model's."""
    from .blocks import pass_through, replaced_forwards
    device = next(model.parameters()).device
    stored = {}

    def replay(last, *args, **kwargs):
        x = stored["out"] if last else pass_through(*args, **kwargs)
        return (x,) if as_tuple else x
    nll, count = 0.0, 0
    last = len(blocks) - 1
    with replaced_forwards(blocks, lambda i: functools.partial(replay, i == last)):
        for j in range(len(chunks)):
            stored["out"] = hidden[j]
            ids = chunks[j:j + 1].to(device)
            nll += token_nll(model(ids, use_cache=False).logits, ids)
            count += ids[:, 1:].numel()
    return nll, count
