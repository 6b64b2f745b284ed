"""The sequence protocol: a BOS at the start of every chunk and calibration window exactly when
the tokenizer adds one to a text (or as --bos forces), perplexity through the library equal to
a direct computation under it, and the protocol written in the report."""
import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from prunerzero.data import NO_BOS, DataError, calibration_samples, chunks, sequences_for, tokenize
from prunerzero.pipeline import run_apply, run_eval

from tiny import text, tiny_llama, word_tokenizer

def test_auto_follows_the_tokenizer_and_the_overrides_force_it():
    with_bos, without = word_tokenizer(True), word_tokenizer(False)
    assert sequences_for(with_bos).bos == 1
    assert sequences_for(without).bos is None
    assert sequences_for(without, "always").bos == 1
    assert sequences_for(with_bos, "never") == NO_BOS
    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    with pytest.raises(DataError, match="no BOS token"):
        sequences_for(plain, "always")
    with pytest.raises(DataError, match="--bos"):
        sequences_for(with_bos, "sometimes")


def test_chunks_and_windows_start_with_bos_and_cover_the_text_without_overlap():
    tok = word_tokenizer(True)
    ids = tokenize(tok, text())
    seq = sequences_for(tok)
    c = chunks(ids, 16, seq=seq)
    assert c.shape[1] == 16 and (c[:, 0] == 1).all()
    assert torch.equal(c[:, 1:].reshape(1, -1), ids[:, :c.shape[0] * 15])  # consecutive text, no gaps
    samples, starts = calibration_samples(ids, 5, 16, 0, seq)
    assert (samples[:, 0] == 1).all()
    assert all(torch.equal(samples[i, 1:], ids[0, s:s + 15]) for i, s in enumerate(starts))
    # never: the published protocol, seqlen text tokens per chunk
    assert torch.equal(chunks(ids, 16), ids[:, :ids.shape[1] // 16 * 16].reshape(-1, 16))


def direct_perplexity(model, ids, seqlen, bos):
    """exp(mean NLL) of non-overlapping windows, each scored alone, with an optional BOS in front."""
    step = seqlen - (bos is not None)
    nll, count = 0.0, 0
    for k in range(ids.shape[1] // step):
        window = ids[0, k * step:(k + 1) * step].tolist()
        x = torch.tensor([([bos] if bos is not None else []) + window])
        with torch.no_grad():
            logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
        nll -= float(logp.gather(1, x[0, 1:, None]).sum())
        count += x.shape[1] - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("adds_bos, choice, bos", [(True, "auto", 1), (False, "auto", None),
                                                   (True, "never", None), (False, "always", 1)])
def test_perplexity_through_the_library_equals_a_direct_computation(tmp_path, adds_bos, choice, bos):
    tok = word_tokenizer(adds_bos)
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "eval.txt").write_text(text(400, 1))
    lines = []
    got = run_eval(model=str(tmp_path / "m"), eval_data=str(tmp_path / "eval.txt"), seqlen=16, bos=choice, log=lines.append)
    ids = tokenize(tok, (tmp_path / "eval.txt").read_text())
    assert got == pytest.approx(direct_perplexity(model, ids, 16, bos), rel=1e-5)
    assert any(("BOS token 1" if bos else "no BOS token") in line for line in lines)


def test_apply_states_the_protocol_in_its_report(tmp_path):
    tok = word_tokenizer(True)
    tiny_llama().save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "cal.txt").write_text(text(800, 2))
    (tmp_path / "eval.txt").write_text(text(300, 3))
    run_apply(model=str(tmp_path / "m"), metric="wanda", sparsity=0.5, output=str(tmp_path / "out"), nsamples=4, seqlen=16,
              calibration=str(tmp_path / "cal.txt"), eval_data=str(tmp_path / "eval.txt"), log=lambda *a: None)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["bos"].startswith("BOS token 1 at the start of every chunk")
    assert report["skipped"] == {"model.embed_tokens": "embedding", "lm_head": "output head"}
