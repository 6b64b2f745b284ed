"""The dense stream on the first calibration windows only (Update.dense_windows): error
correction estimates its cross term from the paired windows and tuning fits them, for a
fraction of the dense stream's cost. Checked on the recorder's estimator, on every walk that
carries the stream (unstaged, staged in lockstep, staged with stored or re-run dense halves,
one-shot tuning) and end to end."""
import logging

import pytest
import torch

from prunerzero.checks import SettingsError
from prunerzero.engine.blocks import blockwise
from prunerzero.engine.calibration import PairedHessians
from prunerzero.engine.layers import matrix
from prunerzero.engine.models import all_prunable
from prunerzero.engine.prune import apply_metric
from prunerzero.engine.reconstruct import Update
from prunerzero.search import recipe

from families import FAMILIES
from test_staged import assert_same_walk, halve_by_magnitude, staged_walk
from tiny import tiny_llama, token_samples


def paired_batch(rec, lin, x, xd=None):
    """One batch through `lin`: its dense half first (xd), or alone when there is none."""
    if xd is None:
        rec.alone()
    else:
        rec.capture()
        lin(xd)
        rec.capturing = False
    lin(x)


def test_the_cross_term_scales_the_paired_windows_error_to_every_token():
    lin = torch.nn.Linear(8, 4)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(10, 8, generator=g) for _ in range(3)]
    xds = [x + 0.3 * torch.randn(10, 8, generator=g) for x in xs]
    with PairedHessians({"a": lin}) as rec:
        paired_batch(rec, lin, xs[0], xds[0])
        paired_batch(rec, lin, xs[1])            # no dense half
        paired_batch(rec, lin, xs[2], xds[2])    # paired again after one alone: still counted
        rec.settle()
    H = sum(x.T @ x for x in xs)
    Hp = xs[0].T @ xs[0] + xs[2].T @ xs[2]
    Kp = xs[0].T @ xds[0] + xs[2].T @ xds[2]
    torch.testing.assert_close(rec.H["a"], H)
    torch.testing.assert_close(rec.cross("a"), H + 1.5 * (Kp - Hp))
    assert "a" not in rec.unpaired


def test_with_no_earlier_error_the_estimate_is_exact():
    lin = torch.nn.Linear(8, 4)
    xs = [torch.randn(10, 8) for _ in range(4)]
    with PairedHessians({"a": lin}) as rec:
        paired_batch(rec, lin, xs[0], xs[0].clone())
        for x in xs[1:]:
            paired_batch(rec, lin, x)
        rec.settle()
    torch.testing.assert_close(rec.cross("a"), rec.H["a"])


def weights(model) -> torch.Tensor:
    return torch.cat([matrix(m).flatten() for m in all_prunable(model).values()])


@pytest.mark.parametrize("staged", [0, 1])
def test_windows_covering_every_sample_prune_to_the_bit_as_the_whole_stream(staged):
    samples = token_samples(n=4, seqlen=16)
    got = []
    for windows in (0, 4, 9):
        model = tiny_llama(layers=2)
        apply_metric(model, "wanda", 0.5, calibration=samples, progress=False,
                     update=Update("admm", iters=4, gradual=2, correct=0.5, staged=staged, tune=1,
                                   dense_windows=windows))
        got.append(weights(model))
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


def counting_walk(monkeypatch, staged: bool, store: bool, lockstep: bool, windows: int, dense=False):
    """A paired, tuned walk on a tiny Llama over 5 samples of 16 tokens: per block and shared input,
    (tokens, paired tokens) as the recorder counted them, and the targets each tuning got."""
    from prunerzero.engine import stages
    monkeypatch.setattr(stages, "DENSE_STORE_BYTES", (2 << 30) * store)
    monkeypatch.setattr(stages, "LOCKSTEP_BYTES", (2 << 30) * lockstep)
    counts, tuned = {}, []

    def prune_block(i, linears, rec):
        for n in rec.H:
            counts[i, n] = tuple(rec._rows[n]) if isinstance(rec, PairedHessians) else None
        halve_by_magnitude(linears)
    blockwise(tiny_llama(layers=2), token_samples(n=5, seqlen=16), PairedHessians, prune_block, progress=False,
              dense=dense, paired=not dense, staged=staged, dense_windows=windows,
              tune=lambda block, linears, inputs, targets, call: tuned.append(len(targets)))
    return counts, tuned


@pytest.mark.parametrize("walk", ["unstaged", "lockstep", "stages, stored", "stages, re-run"])
def test_the_dense_stream_covers_only_the_first_windows(walk, monkeypatch):
    counts, tuned = counting_walk(monkeypatch, staged=walk != "unstaged", store=walk != "stages, re-run",
                                  lockstep=walk == "lockstep", windows=2)
    assert len(counts) >= 8 and tuned == [2, 2]
    assert set(counts.values()) == {(5 * 16, 2 * 16)}


def test_one_shot_tuning_fits_the_first_windows(monkeypatch):
    _, tuned = counting_walk(monkeypatch, staged=False, store=True, lockstep=False, windows=3, dense=True)
    assert tuned == [3, 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_staged_walk_estimates_alike_from_the_first_windows(family, monkeypatch):
    """Lockstep, stored dense halves and re-run dense halves record the same H and estimated K
    when the dense stream covers 2 of 3 samples, and prune to the same weights; the estimate
    is not the whole stream's K."""
    lockstep = staged_walk(family, monkeypatch, store=True, lockstep=True, dense_windows=2)
    assert_same_walk(lockstep, staged_walk(family, monkeypatch, store=True, lockstep=False, dense_windows=2))
    assert_same_walk(lockstep, staged_walk(family, monkeypatch, store=False, lockstep=False, dense_windows=2))
    whole = staged_walk(family, monkeypatch, store=True, lockstep=True)
    differ = [k for k, (H, K) in whole[0].items() if K is not None and lockstep[0][k][1] is not None
              and not torch.allclose(K, lockstep[0][k][1], rtol=1e-4, atol=1e-4)]
    assert differ


def test_half_the_windows_still_bring_the_model_closer_to_the_dense_one():
    samples = token_samples(n=8, seqlen=32)
    with torch.no_grad():
        want = tiny_llama(layers=3)(samples).logits
    errors = {}
    # (a share of 1.0 would fit the estimate's noise in full: the recipes take 0.2)
    for name, update in {"none": Update("admm"), "whole": Update("admm", correct=0.5),
                         "half": Update("admm", correct=0.5, dense_windows=4)}.items():
        model = tiny_llama(layers=3)
        report = apply_metric(model, "wanda", 0.5, "2:4", calibration=samples, update=update, progress=False)
        assert report.sparsity == pytest.approx(0.5)
        with torch.no_grad():
            errors[name] = float((model(samples).logits - want).pow(2).mean())
    assert errors["half"] < errors["none"] and errors["half"] != errors["whole"]


def test_the_setting_is_checked_written_and_kept_by_the_search(caplog):
    with pytest.raises(SettingsError, match="dense.windows"):
        Update("admm", correct=0.2, dense_windows=-1)
    update = Update.parse("admm correct=0.2 dense_windows=8")
    assert update.dense_windows == 8 and Update.parse(update.spec()) == update
    assert update.describe()["dense_windows"] == 8
    assert "dense_windows" not in Update("admm", dense_windows=8).describe()   # nothing to limit
    import random
    rng, spec = random.Random(0), update.spec()
    for _ in range(40):   # correct= moves to 0 and back: the setting stays
        spec = recipe.mutate(spec, rng)
        assert Update.parse(spec).dense_windows == 8, spec
    with caplog.at_level(logging.WARNING, logger="prunerzero.engine.prune"):
        apply_metric(tiny_llama(layers=1), "wanda", 0.5, calibration=token_samples(n=2, seqlen=16), progress=False,
                     update=Update("admm", iters=2, gradual=1, dense_windows=1))
    assert "no effect" in caplog.text
