"""Perplexity as SparseGPT and Wanda compute it: non-overlapping chunks scored on their own,
exp of the mean token NLL."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.inference_mode()
def nll_sum(model, chunks: torch.Tensor, batch_size: int = 4, progress: bool = True) -> tuple[float, int]:
    """Total next-token NLL over (k, seqlen) token chunks, and the number of tokens scored."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(chunks), batch_size), desc="perplexity", disable=not progress, leave=False):
        ids = chunks[i:i + batch_size].to(device)
        logits = model(ids).logits[:, :-1].float()
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return nll, count


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
