"""Forward latency and throughput of a causal LM on random tokens: what a smaller dense
model buys. Median of several timed passes after a warm-up."""
from __future__ import annotations

import statistics
import time

import torch


@torch.inference_mode()
def latency(model, batch: int = 1, seqlen: int = 512, repeats: int = 5, warmup: int = 1, seed: int = 0) -> dict:
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(seed)).to(device)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return dict(batch=batch, seqlen=seqlen, repeats=repeats, median_s=med, min_s=min(times),
                tokens_per_s=batch * seqlen / med)
