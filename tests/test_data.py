"""Data sources and samplers against the protocol of ../shared/REFERENCE.md."""
import os
from pathlib import Path

import pytest
import torch

from prunerzero import data

DATA = Path(os.environ.get("PRUNERZERO_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
HAVE_WT2 = (DATA / "wikitext-2-raw" / "wiki.test.raw").is_file()
REFERENCE_STARTS = [807917, 882002, 84901, 542987, 1019064, 849208, 636092, 999496, 750883, 458107, 1058405,
                    292078, 591056, 293068, 198874, 525349, 308200, 650426, 207121, 154649, 692473, 990155,
                    211185, 741954, 910524, 663112, 428820, 1000362, 928395, 546291, 130609, 29447]


def test_calibration_windows_are_wandas_draws():
    assert data.calibration_windows(1_068_344, 32, 512, 0) == REFERENCE_STARTS


def test_chunks_skip_excluded_ranges():
    ids = torch.arange(100).reshape(1, -1)
    got = data.chunks(ids, 10, exclude=[(15, 25)])
    assert [int(c[0]) for c in got] == [0, 30, 40, 50, 60, 70, 80, 90]
    assert len(data.chunks(ids, 10, limit=3)) == 3
    with pytest.raises(data.DataError):
        data.chunks(ids[:, :5], 10)


def test_unknown_source_and_short_text_fail_clearly():
    with pytest.raises(data.DataError, match="unknown text source"):
        data.load_text("no-such-corpus")
    with pytest.raises(data.DataError, match="fewer than seqlen"):
        data.calibration_windows(100, 4, 512, 0)


@pytest.mark.skipif(not HAVE_WT2, reason="needs WikiText-2 under PRUNERZERO_DATA_DIR")
def test_real_corpora_tokenize_to_the_reference_counts():
    from transformers import AutoTokenizer
    from prunerzero.engine.models import default_model_path
    rows = data.wikitext2_rows("test", DATA)
    assert len(rows) == 4358
    tok = AutoTokenizer.from_pretrained(default_model_path())
    assert data.tokenize(tok, "\n\n".join(rows)).shape[1] == 304_986
    assert data.tokenize(tok, data.wikipedia_text()).shape[1] == 1_068_344


def test_without_a_local_copy_an_unreachable_hub_fails_at_once(tmp_path, monkeypatch):
    """No local WikiText-2 and no hub: one clear error straight away, not datasets' retries."""
    import datasets

    def never(*a, **k):
        raise AssertionError("datasets was asked although the hub is unreachable")
    monkeypatch.setattr(datasets, "load_dataset", never)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not data.hub_reachable()
    with pytest.raises(data.DataError, match="hub cannot be reached.*PRUNERZERO_DATA_DIR"):
        data.wikitext2_rows("test", tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(data, "_HUB", ("127.0.0.1", 9))   # nothing listens on the discard port
    data._connects.cache_clear()
    assert not data.hub_reachable(timeout=0.5)
