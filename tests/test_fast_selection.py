"""The fast mask selections (numpy's introselect for the k-th score, N:M by elementwise ranks,
rows grouped by count, the N:M fraction chosen among +inf-padded scores) choose exactly what a
stable sort chooses, and ADMM built on them gives the iterates of the textbook loop whose masks
come from a stable sort."""
import numpy as np
import pytest
import torch

from prunerzero.engine import masks
from prunerzero.engine.masks import (kth_smallest, lowest_k, lowest_per_row, merge_network, nm_fraction, nm_mask,
                                     row_counts, sorted_places)
from prunerzero.engine.reconstruct import Update, admm_factor, admm_weights
from prunerzero.language.compile import DegenerateMetricError, NonFiniteScoreError, check_scores


def by_sort(scores, ks):
    """The reference: the ks[r] first of each row's stable ascending order."""
    order = torch.sort(scores, dim=-1, stable=True).indices
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1]).expand_as(order).contiguous())
    return ranks < torch.as_tensor(ks).reshape(-1, 1)


def nm_by_sort(scores, n, m):
    rows, cols = scores.shape
    return by_sort(scores.reshape(-1, m), torch.full((rows * cols // m,), n)).reshape(rows, cols)


def scores_of(kind, rows=37, cols=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    if kind == "coarse":      # ties everywhere, as 4-bit weights give
        s = (s * 2).round()
        s[1, ::2] = -0.0
    elif kind == "tied rows":
        s[3] = 1.0
        s[5, :40] = s[5, 0]
    elif kind == "infinite":
        s[0, 3], s[2, 7] = float("inf"), float("-inf")
    return s.to(dtype)


KINDS = ["continuous", "coarse", "tied rows", "infinite"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_kth_smallest_and_lowest_k_equal_a_stable_sort(kind, dtype):
    s = scores_of(kind, dtype=dtype)
    for k in (1, 5, 32, 63, 64):
        assert torch.equal(kth_smallest(s, k), torch.sort(s, dim=-1).values[:, k - 1:k])
        assert torch.equal(lowest_k(s, k), by_sort(s, torch.full((len(s),), k)))
        flat = s.reshape(1, -1)
        assert torch.equal(lowest_k(flat, 7 * k), by_sort(flat, [7 * k]))


@pytest.mark.parametrize("kind", KINDS)
def test_rows_with_different_counts_equal_a_stable_sort(kind):
    s = scores_of(kind)
    for ks in (row_counts(37, 37 * 30 + 11), torch.full((37,), 9), torch.arange(37) % 7 + 20):
        assert torch.equal(lowest_per_row(s, ks), by_sort(s, ks))


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 4), (4, 8), (5, 8), (2, 16), (8, 16)])
@pytest.mark.parametrize("kind", KINDS + ["nan"])
def test_nm_masks_equal_a_stable_sort(kind, n, m):
    s = scores_of("continuous" if kind == "nan" else kind)
    if kind == "nan":   # the sort puts NaN last; the ranked path must not see it
        s[4, 1] = float("nan")
    assert torch.equal(nm_mask(s, n, m), nm_by_sort(s, n, m))


@pytest.mark.parametrize("n, m", [(2, 5), (3, 6), (4, 7), (1, 3)])
@pytest.mark.parametrize("kind", KINDS)
def test_nm_masks_of_any_group_width_equal_a_stable_sort(kind, n, m):
    # group widths other than the powers of two the other tests take
    s = scores_of(kind, cols=9 * m)
    assert torch.equal(nm_mask(s, n, m), nm_by_sort(s, n, m))


@pytest.mark.parametrize("m", range(2, 17))
def test_the_merge_network_sorts_every_input(m):
    # the 0-1 principle: a comparator network that sorts every 0/1 input sorts every input
    bits = torch.arange(2 ** m).unsqueeze(-1).bitwise_right_shift(torch.arange(m)).bitwise_and(1).float()
    places = torch.stack(sorted_places(bits.unsqueeze(0)), -1)[0]
    assert torch.equal(places, bits.sort(-1).values)
    assert all(i < j < m for i, j in merge_network(m))


def test_the_network_puts_nan_in_every_place_of_its_group():
    s = scores_of("continuous", cols=64)
    s[2, 9] = float("nan")
    places = sorted_places(s.reshape(37, 8, 8))
    assert all(bool(p[2, 1].isnan()) for p in places)
    assert not any(bool(p.isnan().sum() != 1) for p in places)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (5, 8), (8, 16), (2, 5), (3, 6)])
@pytest.mark.parametrize("kind", KINDS + ["nan"])
def test_nm_fractions_equal_the_padded_selection(kind, n, m):
    """ADMM's N:M mask on its way: the lowest fraction of the pattern's pruned weights, as the
    selection among all scores with the others at +inf chooses it (stable row-major ties)."""
    s = scores_of("continuous" if kind == "nan" else kind, cols=16 * m)
    if kind == "nan":
        s[4, 1] = float("nan")
    full = nm_by_sort(s, n, m)
    padded = torch.where(full, s, torch.inf).reshape(1, -1)
    for fraction in (0.0, 0.01, 0.271, 0.5, 0.93, 0.999):
        k = int(full.sum() * fraction)
        assert torch.equal(nm_fraction(s, n, m, fraction), by_sort(padded, [k]).reshape(s.shape)), fraction


def textbook_admm(W, H, score, sparsity, structure, update, count=None):
    """ADMM as written in the paper (Boza 2024), with masks from a stable sort: Z the projection
    of W + U on the mask, U += W - Z, W solves the penalised least squares. Unit-diagonal
    coordinates and damping as admm_factor."""
    Hd = H.double()
    norm = Hd.diagonal().sqrt()
    Hn = Hd / norm / norm[:, None]
    Hn.diagonal().add_(update.damping * Hn.diagonal().mean())
    A = torch.linalg.inv(Hn + update.rho * torch.eye(len(H), dtype=torch.float64))
    W0 = W.double() * norm
    cols = W.shape[1]

    def mask_of(current, fraction):
        s = score((current / norm).float()).double()
        if structure == "unstructured":
            k = int(count * fraction) if count is not None else None
            if count is None:
                return by_sort(s, torch.full((len(s),), int(cols * sparsity * fraction)))
            return by_sort(s, row_counts(len(s), k))
        full = nm_by_sort(s, 2, 4)
        if fraction >= 1:
            return full
        k = int(full.sum() * fraction)
        flat = torch.where(full, s, torch.inf).reshape(1, -1)
        return by_sort(flat, [k]).reshape(full.shape)

    Wc, U = W0.clone(), torch.zeros_like(W0)
    for t in range(update.iters):
        if t < update.gradual:
            mask = mask_of(Wc + U, 1 - (1 - (t + 1) / update.gradual) ** 3)
        Z = (Wc + U).masked_fill(mask, 0)
        U = U + Wc - Z
        Wc = (W0 @ Hn + update.rho * (Z - U)) @ A
    return ((Wc + U).masked_fill(mask, 0) / norm).float(), mask


@pytest.mark.parametrize("structure, count", [("unstructured", None), ("unstructured", 24 * 64 // 2 + 13),
                                              ("2:4", None)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_admm_with_the_fast_selections_is_the_textbook_admm(structure, count, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(64, 64, generator=g) / 8 + torch.eye(64)
    X = torch.randn(512, 64, generator=g) @ mix
    H, W = X.T @ X, torch.randn(24, 64, generator=g)
    x = H.diagonal().sqrt()
    score = lambda w: w.abs() * x   # noqa: E731  (Wanda's metric)
    update = Update("admm")
    ours = admm_weights(W, admm_factor(H, update), score, 0.5, structure, "row", update, count)
    ref, mask = textbook_admm(W, H, score, 0.5, structure, update, count)
    assert torch.equal(ours == 0, mask)
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_admm_checks_the_first_and_last_selections_and_chooses_alike(structure):
    """The selections on the way to the final mask take the metric's unchecked scores; the first
    (on the dense weights) and the last are checked, and the weights come out the same as when
    every selection is checked."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(256, 32, generator=g)
    H, W = X.T @ X, torch.randn(12, 32, generator=g)
    from prunerzero.language.compile import scorer
    from prunerzero.language.metric import Metric
    fn = Metric.parse("sqr(W)*X").compile()
    checked, calls = scorer("layer", fn, {"X": H.diagonal().sqrt()}), []

    def counting(w):
        calls.append(True)
        return checked(w)
    counting.unchecked = lambda w: calls.append(False) or checked.unchecked(w)
    update = Update("admm", gradual=6, iters=8)
    ours = admm_weights(W, admm_factor(H, update), counting, 0.5, structure, "row", update)
    assert calls == [True] + [False] * 4 + [True]
    every = admm_weights(W, admm_factor(H, update), checked.__call__, 0.5, structure, "row", update)
    assert torch.equal(ours, every)
    nan_metric = scorer("layer", lambda w: w * float("nan"), {})
    with pytest.raises(NonFiniteScoreError):
        admm_weights(W, admm_factor(H, update), nan_metric, 0.5, structure, "row", update)


def test_the_one_pass_score_check_refuses_what_it_refused():
    check_scores(torch.rand(4, 6))
    for bad in (float("nan"), float("inf"), float("-inf")):
        s = torch.rand(4, 6)
        s[2, 3] = bad
        with pytest.raises(NonFiniteScoreError, match="1 NaN or infinite"):
            check_scores(s)
    with pytest.raises(DegenerateMetricError, match="every weight"):
        check_scores(torch.ones(4, 6))
    rows = torch.arange(4.0).reshape(4, 1).expand(4, 6)
    with pytest.raises(DegenerateMetricError, match="of a row"):
        check_scores(rows)
    check_scores(torch.rand(5, 1))         # one column: rows cannot tie within themselves


def test_the_selection_without_numpy_counts_ties_itself():
    """Integer scores take torch's kthvalue, which says nothing of surplus ties: lowest_k counts
    them, and still chooses as a stable sort does."""
    s = (scores_of("coarse", dtype=torch.float64) * 3).to(torch.int64)
    for k in (1, 5, 32, 63, 64):
        assert torch.equal(lowest_k(s, k), by_sort(s, torch.full((len(s),), k)))


@pytest.mark.parametrize("kind", ["plain", "coarse", "tied rows", "infinite"])
def test_selection_shared_among_threads_equals_a_stable_sort(kind, monkeypatch):
    """Rows split among threads (forced here on a small matrix) select exactly as one thread
    and as a stable sort, ties broken on the tied rows only."""
    s = scores_of("continuous" if kind == "plain" else kind, rows=53, cols=96, seed=3)
    monkeypatch.setattr(masks, "PARTITION_SPLIT", 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert np.array_equal(masks.partition(s.numpy(), 40), np.partition(s.numpy(), 40, axis=-1))
        for k in (1, 41, 95, 96):
            assert torch.equal(lowest_k(s, k), by_sort(s, torch.full((len(s),), k)))
    finally:
        torch.set_num_threads(threads)


def _select_in_child(s, k, out):
    torch.set_num_threads(2)   # a forked child may start with one thread: the pools need two
    out.put(lowest_k(s, k).tolist())   # plain data: a tensor would be shared through the child's memory


def test_a_forked_child_selects_with_threads_of_its_own(monkeypatch):
    """The thread pools are per process: a child forked after the parent used them selects too
    (inherited pools have no threads, and would wait forever)."""
    import multiprocessing as mp
    monkeypatch.setattr(masks, "PARTITION_SPLIT", 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        s = scores_of("continuous", rows=40, cols=64)
        expected = lowest_k(s, 20)                       # the parent's pool now exists
        ctx = mp.get_context("fork")
        out = ctx.Queue()
        child = ctx.Process(target=_select_in_child, args=(s, 20, out))
        child.start()
        child.join(60)
        hung = child.is_alive()
        if hung:
            child.kill()
        assert not hung, "the forked child waited on its parent's threads"
        assert out.get(timeout=10) == expected.tolist()
    finally:
        torch.set_num_threads(threads)
