import pytest
import torch

from prunerzero.engine.masks import lowest_k, SparsityError, layer_mask, make_mask, nm_mask, parse_structure, row_mask


def test_row_mask_prunes_exactly_k_per_row():
    s = torch.rand(7, 40)
    m = row_mask(s, 0.5)
    assert (m.sum(1) == 20).all()
    # pruned scores are all <= kept scores in each row
    assert (s.masked_fill(~m, -1).amax(1) <= s.masked_fill(m, 2).amin(1)).all()


def test_ties_break_by_lower_index_first():
    s = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.5, 2.0]])
    assert row_mask(s, 0.5).tolist() == [[True, True, False, False, True, False]]


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.97])
def test_selection_masks_equal_a_stable_sort_on_tied_scores(sparsity):
    # scores on a coarse grid (like the bundled model's 4-bit weights) tie often, and zeros
    # and negative zeros compare equal: the selection must pick what a stable sort picks
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(33, 57, generator=g) * 2).round()
    s[0] = 0.0
    s[1, ::2] = -0.0
    k = int(57 * sparsity)
    by_sort = torch.zeros_like(s, dtype=torch.bool).scatter_(1, torch.sort(s, dim=1, stable=True).indices[:, :k], True)
    assert torch.equal(row_mask(s, sparsity), by_sort)
    k = int(s.numel() * sparsity)
    flat = torch.zeros(s.numel(), dtype=torch.bool)
    flat[torch.sort(s.flatten(), stable=True).indices[:k]] = True
    assert torch.equal(layer_mask(s, sparsity), flat.reshape(s.shape))


def test_selection_without_ties_and_with_ties_in_some_rows_equals_a_stable_sort():
    # the common case (no surplus ties anywhere) takes a shortcut; one tied row must not let it
    g = torch.Generator().manual_seed(2)
    s = torch.rand(40, 96, generator=g)
    for tied in (False, True):
        if tied:
            s[7, :50] = s[7, 0]
        k = 37
        by_sort = torch.zeros_like(s, dtype=torch.bool).scatter_(1, torch.sort(s, dim=1, stable=True).indices[:, :k],
                                                                 True)
        assert torch.equal(lowest_k(s, k), by_sort)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_prunes_n_of_every_m(n, m):
    s = torch.rand(5, 32)
    mask = nm_mask(s, n, m)
    assert (mask.reshape(5, -1, m).sum(-1) == n).all()


def test_structures_are_validated():
    assert parse_structure("2:4", 0.5) == (2, 4)
    for bad_structure, sp in [("4:2", 0.5), ("2:2", 0.5), ("0:4", 0.5), ("2-4", 0.5), ("unstructured", 1.0),
                              ("unstructured", -0.1)]:
        with pytest.raises(SparsityError):
            parse_structure(bad_structure, sp)
    with pytest.raises(SparsityError, match="divisible"):
        make_mask(torch.rand(3, 10), 0.5, "2:4")
