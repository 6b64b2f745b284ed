"""Scores to masks (True = prune), with exact counts and deterministic ties."""
from __future__ import annotations

import functools
import os
import re

import numpy as np
import torch

from ..errors import PrunerZeroError


class SparsityError(PrunerZeroError, ValueError):
    """A sparsity or N:M pattern that cannot be met."""


def parse_structure(structure: str, sparsity: float) -> tuple[int, int] | None:
    """None for unstructured, else (n, m): n of every m consecutive input weights pruned."""
    if structure == "unstructured":
        if not 0.0 <= sparsity < 1.0:
            raise SparsityError(f"--sparsity must be in [0, 1), got {sparsity}")
        return None
    match = re.fullmatch(r"(\d+):(\d+)", structure)
    if not match:
        raise SparsityError(f"--structure must be 'unstructured' or 'N:M' such as 2:4, got '{structure}'")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise SparsityError(f"N:M needs 0 < N < M, got {structure}")
    return n, m


def resolve_sparsity(structure: str, sparsity: float | None) -> float:
    """The fraction pruned: `sparsity` (0.5 when None) for unstructured, N/M for N:M, where a
    sparsity given as well must agree (2:4 with 0.9 would otherwise be ignored silently)."""
    nm = parse_structure(structure, 0.5 if sparsity is None else sparsity)
    if nm is None:
        return 0.5 if sparsity is None else float(sparsity)
    implied = nm[0] / nm[1]
    if sparsity is not None and abs(sparsity - implied) > 1e-9:
        raise SparsityError(f"--structure {structure} prunes {implied:g} of the weights; --sparsity {sparsity:g} "
                            f"contradicts it (leave --sparsity out with N:M)")
    return implied


def check_widths(layers: dict, structure: str) -> None:
    """Refuse an N:M pattern that some layer's input width cannot hold, before any work."""
    nm = parse_structure(structure, 0.5)
    if nm is None:
        return
    from .layers import in_features
    bad = {name: in_features(m) for name, m in layers.items() if in_features(m) % nm[1]}
    if bad:
        name, width = next(iter(bad.items()))
        raise SparsityError(f"--structure {structure} needs input widths divisible by {nm[1]}; {len(bad)} layer(s) "
                            f"are not, e.g. {name} with {width}")


def kth_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest score of each row (k >= 1), shape (..., 1). On the CPU numpy's
    introselect finds it: 3x faster than torch's kthvalue per row and 10x on one long row
    (torch's runs one thread there), measured in experiments/bench_selection.py; the value
    is the same element either way."""
    return _select(scores, k)[0]


def _select(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(kth_smallest, the rows with more scores equal to their k-th than the k lowest hold, as a
    boolean of the leading shape, or None where no row has). numpy's partition leaves every
    row's scores past the k-th at its right, so their minimum tells it: a pass over half the
    row, where counting each row's scores up to the k-th (what torch's kthvalue leaves to do)
    takes a pass over all of it and a boolean sum (2-3x the partition's own time on ADMM's
    layers)."""
    if scores.device.type == "cpu" and scores.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        a = scores.detach()
        a = a.float() if a.dtype in (torch.float16, torch.bfloat16) else a   # exact: every value fits
        part = partition(a.numpy(), k - 1)
        kth = part[..., k - 1:k]
        tied = part[..., k:].min(-1) == kth[..., 0] if k < part.shape[-1] else None
        tied = torch.from_numpy(tied) if tied is not None and tied.any() else None
        return torch.from_numpy(kth).to(scores.dtype), tied
    kth = scores.kthvalue(k, dim=-1, keepdim=True).values
    tied = (scores <= kth).sum(-1) != k
    return kth, tied if bool(tied.any()) else None


# Rows are split among threads only above this many scores per thread: below it the threads'
# start costs more than they save.
PARTITION_SPLIT = 1 << 16


def partition(a: np.ndarray, kth: int) -> np.ndarray:
    """np.partition along the last axis, the rows shared among torch's intra-op threads (numpy's
    selection releases the GIL but runs on one thread; on ADMM's 4096-wide layers it cost half
    an iteration's matrix product). Each row is partitioned alone, so the result is the same."""
    rows = a.reshape(-1, a.shape[-1])
    workers = min(torch.get_num_threads(), len(rows), a.size // PARTITION_SPLIT)
    if workers <= 1:
        return np.partition(a, kth, axis=-1)
    out = np.empty_like(rows)
    bounds = np.linspace(0, len(rows), workers + 1).astype(int)

    def run(i):
        out[bounds[i]:bounds[i + 1]] = np.partition(rows[bounds[i]:bounds[i + 1]], kth, axis=-1)
    list(_threads(workers).map(run, range(workers)))
    return out.reshape(a.shape)


@functools.lru_cache(maxsize=None)
def _threads(workers: int):
    from concurrent.futures import ThreadPoolExecutor
    return ThreadPoolExecutor(workers, thread_name_prefix="prunerzero-select")


# a forked child inherits the pools but not their threads: it would wait on them forever
os.register_at_fork(after_in_child=_threads.cache_clear)


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the k lowest scores of each row; among equal scores the lower column index is
    taken first, exactly as a stable sort would, so ties break the same way everywhere.
    A selection (kth_smallest) costs a fraction of a sort; the cumulative count that breaks
    ties runs only on the rows with more weights at the k-th score than the count needs."""
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth, tied = _select(scores, k)
    mask = scores <= kth
    if tied is None:    # no row has surplus ties at its k-th score (the usual case)
        return mask
    at = tied.to(scores.device).nonzero(as_tuple=True)
    sub, edge = scores[at], kth[at]
    below, tie = sub < edge, sub == edge
    need = k - below.sum(-1, keepdim=True)
    mask[at] = below | (tie & (tie.cumsum(-1) <= need))
    return mask


def lowest_per_row(scores: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """True at the ks[r] lowest scores of each row r (stable ties, as lowest_k). Rows that
    prune the same count are selected together (an exact allocation has at most two counts
    per layer); many distinct counts fall back to ranking by a stable sort."""
    ks = ks.reshape(-1).to(scores.device)
    counts = ks.unique()
    if len(counts) > 4:
        order = torch.sort(scores, dim=-1, stable=True).indices
        ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device)
                                                  .expand_as(order).contiguous())
        return ranks < ks.reshape(-1, 1)
    if len(counts) == 1:
        return lowest_k(scores, int(counts[0]))
    mask = torch.empty_like(scores, dtype=torch.bool)
    for k in counts.tolist():
        rows = (ks == k).nonzero().reshape(-1)
        mask[rows] = lowest_k(scores[rows], k)
    return mask


def row_counts(rows: int, count: int) -> torch.Tensor:
    """`count` pruned weights spread over `rows` rows as evenly as integers allow: the first
    count % rows rows prune one more, so a layer's total is exact to the weight."""
    ks = torch.full((rows,), count // rows, dtype=torch.long)
    ks[:count % rows] += 1
    return ks


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the int(in * sparsity) lowest scores of each row (stable ties)."""
    return lowest_k(scores, int(scores.shape[-1] * sparsity))


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the int(numel * sparsity) lowest scores of the whole matrix (one comparison group
    per layer, as published magnitude pruning does); stable ties in row-major order."""
    flat = scores.reshape(1, -1)
    return lowest_k(flat, int(flat.shape[-1] * sparsity)).reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the n lowest of every m consecutive input columns of each row (stable ties)."""
    rows, cols = scores.shape
    if cols % m:
        raise SparsityError(f"{n}:{m} needs in_features divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    if m <= NETWORK_M:
        places = sorted_places(groups)
        if not _holds_nan(places, n):
            return _pattern(groups, places, n).reshape(rows, cols)
    return _nm_by_sort(groups, n).reshape(rows, cols)   # NaN: the sort, which puts it last


def _holds_nan(places: list[torch.Tensor], n: int) -> bool:
    """Whether some group holds NaN: the network spreads it to every place of its group."""
    return bool(places[n - 1].isnan().any())


def _pattern(groups: torch.Tensor, places: list[torch.Tensor], n: int, cap: torch.Tensor | None = None) -> torch.Tensor:
    """The N:M mask of NaN-free `groups` from their sorted places: the scores up to the n-th
    place (and, given a 0-d `cap`, up to it too: one comparison with the lower of the two),
    except in groups whose n-th and (n+1)-th places are equal (more scores at the edge than the
    n lowest hold), which are ranked alone so that the lower column is taken first, as a stable
    sort does."""
    edge = places[n - 1] if cap is None else torch.minimum(places[n - 1], cap)
    mask = groups <= edge.unsqueeze(-1)
    tied = places[n] == places[n - 1]
    if bool(tied.any()):
        at = tied.nonzero(as_tuple=True)
        sub = groups[at]
        mask[at] = _nm_by_rank(sub, n, sub.shape[-1]) if sub.shape[-1] <= 8 else _nm_by_sort(sub, n)
        if cap is not None:
            mask[at] &= sub <= cap
    return mask


def _nm_by_sort(groups: torch.Tensor, n: int) -> torch.Tensor:
    order = torch.sort(groups, dim=-1, stable=True).indices[..., :n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)


def nm_fraction(scores: torch.Tensor, n: int, m: int, fraction: float) -> torch.Tensor:
    """Of the weights nm_mask prunes, the lowest-scoring `fraction` over the whole matrix (ties in
    row-major order): ADMM's N:M mask on its way to the whole pattern. The scores of the
    weights the pattern prunes are its groups' n lowest places, which the sorting network gives
    (ties at a group's edge included: equal scores are one value), so the selection runs on
    those (n/m of the matrix), not on the matrix with the others set to +inf."""
    rows, cols = scores.shape
    # the count as the +inf-padded selection computed it (an int64 total times a Python float
    # is float32 in torch), so both choose alike at every fraction
    k = int(torch.tensor(rows * cols // m * n) * fraction)
    if m <= NETWORK_M and cols % m == 0 and k > 0:
        groups = scores.reshape(rows, cols // m, m)
        places = sorted_places(groups)
        if not _holds_nan(places, n):
            kth, tied = _select(torch.stack(places[:n]).reshape(1, -1), k)
            if tied is None:   # the pattern's weights at or below the k-th chosen score
                return _pattern(groups, places, n, kth.reshape(())).reshape(rows, cols)
    full = nm_mask(scores, n, m)
    among = torch.where(full, scores, torch.inf).reshape(1, -1)
    return lowest_k(among, k).reshape(full.shape)


# Group widths up to this are sorted by a network of elementwise min/max (19 pairs at M = 8,
# 63 at 16) instead of ranked pair by pair or sorted along the group.
NETWORK_M = 16


def sorted_places(groups: torch.Tensor) -> list[torch.Tensor]:
    """Each group's scores in ascending order, as one tensor per place: Batcher's odd-even merge
    network of elementwise min/max over the group's columns (a NaN anywhere in a group makes
    every place of it NaN, since both of a pair's outputs take it)."""
    places = [groups[..., j] for j in range(groups.shape[-1])]
    for i, j in merge_network(len(places)):
        places[i], places[j] = torch.minimum(places[i], places[j]), torch.maximum(places[i], places[j])
    return places


def merge_network(m: int) -> list[tuple[int, int]]:
    """The compare-exchange pairs (i < j: the smaller to i) of Batcher's odd-even merge sort of m
    wires: merges of sorted runs of p = 1, 2, 4, ... wires, each comparing wires k apart for
    k = p, p/2, ..., 1 within runs of 2p. Pairs that would reach past m are dropped (wires
    there would hold +inf, which no pair moves)."""
    pairs, p = [], 1
    while p < m:
        k = p
        while k >= 1:
            for j in range(k % p, m - k, 2 * k):
                for i in range(min(k, m - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


def _nm_by_rank(groups: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """nm_mask for small M without a sort: a weight's place in its group's stable order is the
    number of its group's scores below it plus the equal ones to its left, so one comparison
    per pair ranks both (i < j: i counts for j unless s_j < s_i, and j counts for i exactly
    then), and m(m-1)/2 elementwise passes rank every group at once (5x faster than the sort
    at 2:4, 2-3x at 4:8). Scores without NaN.

    The passes read strided views of the group positions. A transposed, contiguous copy made
    4:8 ranking 1.4x faster on one thread but 0.7-0.9x as fast on two (the copy runs on one
    thread), so it was not kept."""
    cols = [groups[..., j] for j in range(m)]
    ranks = [torch.zeros(groups.shape[:-1], dtype=torch.uint8, device=groups.device) for _ in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            later_lower = cols[j] < cols[i]
            ranks[i] += later_lower
            ranks[j] += ~later_lower
    return torch.stack(ranks, -1) < n


GROUPS = ("row", "layer")


def make_mask(scores: torch.Tensor, sparsity: float, structure: str = "unstructured", group: str = "row",
              count: int | None = None) -> torch.Tensor:
    """Unstructured masks compare scores within each output row (group="row", Wanda's choice)
    or across the whole layer (group="layer"); N:M compares within each group of M. `count`
    (unstructured): prune exactly this many weights of the layer instead of the sparsity's
    int(in * sparsity) per row (a non-uniform allocation)."""
    nm = parse_structure(structure, sparsity)
    if nm is not None:
        return nm_mask(scores, *nm)
    if group not in GROUPS:
        raise SparsityError(f"comparison group must be one of {GROUPS}, got {group!r}")
    if count is not None:
        if group == "layer":
            return lowest_k(scores.reshape(1, -1), count).reshape(scores.shape)
        return lowest_per_row(scores, row_counts(scores.shape[0], count))
    return row_mask(scores, sparsity) if group == "row" else layer_mask(scores, sparsity)


def measured_sparsity(linears: dict) -> tuple[float, dict[str, float]]:
    """Fraction of exactly-zero weights, total and per layer, read from the weights."""
    per, zeros, total = {}, 0, 0
    for name, m in linears.items():
        z = int((m.weight == 0).sum())
        per[name] = z / m.weight.numel()
        zeros, total = zeros + z, total + m.weight.numel()
    return zeros / max(total, 1), per
