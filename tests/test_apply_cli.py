"""`prunerzero apply` end to end on the real bundled SmolLM2-135M (small settings)."""
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from prunerzero.cli import main
from prunerzero.engine.models import all_prunable, default_model_path

DATA = Path(os.environ.get("PRUNERZERO_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
pytestmark = pytest.mark.skipif(not (DATA / "wikitext-2-raw" / "wiki.test.raw").is_file(),
                                reason="needs WikiText-2 under PRUNERZERO_DATA_DIR")
SMALL = ["--nsamples", "2", "--seqlen", "64", "--eval-chunks", "2", "--data-dir", str(DATA)]


def test_apply_2of4_saves_a_model_that_reloads_with_the_pattern(tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "pruned"
    r = CliRunner().invoke(main, ["apply", "--metric", "wanda", "--structure", "2:4", "--output", str(out), *SMALL])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    for key in ("metric", "canonical", "structure", "sparsity", "layers", "perplexity", "settings", "timings"):
        assert key in report
    assert report["canonical"] == "abs(W)*X" and len(report["layers"]) == 210
    assert report["perplexity"]["pruned"] > report["perplexity"]["dense"] > 1
    pruned = all_prunable(AutoModelForCausalLM.from_pretrained(out))
    dense = all_prunable(AutoModelForCausalLM.from_pretrained(default_model_path()))
    for name, lin in pruned.items():
        zeros = (lin.weight == 0).reshape(lin.weight.shape[0], -1, 4).sum(-1)
        was = (dense[name].weight == 0).reshape(lin.weight.shape[0], -1, 4).sum(-1)
        # exactly 2 of every 4 pruned: a group has more zeros only where the dense model had them
        assert ((zeros == 2) | ((zeros == was) & (was > 2))).all(), name


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    (["--structure", "4:2"], "N:M needs 0 < N < M"),
    (["--metric", "X*G"], "does not depend on W"),
    (["--model", "/no/such/model"], "no model folder at /no/such/model"),
])
def test_bad_input_fails_before_writing_anything(tmp_path, args, message):
    out = tmp_path / "never"
    r = CliRunner().invoke(main, ["apply", "--output", str(out), *args, *SMALL])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not out.exists() and not (tmp_path / "never.partial").exists()


def test_non_empty_output_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    r = CliRunner().invoke(main, ["apply", "--output", str(tmp_path), *SMALL])
    assert r.exit_code == 2 and "not empty" in r.output
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_apply_with_sparsegpt_4of8_updates_weights_and_keeps_the_pattern(tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "sgpt"
    r = CliRunner().invoke(main, ["apply", "--method", "sparsegpt", "--structure", "4:8", "--output", str(out), *SMALL])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "sparsegpt" and report["settings"]["method"] == "sparsegpt"
    pruned = all_prunable(AutoModelForCausalLM.from_pretrained(out))
    dense = all_prunable(AutoModelForCausalLM.from_pretrained(default_model_path()))
    lin, ref = pruned["layers.0.mlp.down_proj"], dense["layers.0.mlp.down_proj"]
    assert ((lin.weight == 0).reshape(lin.weight.shape[0], -1, 8).sum(-1) >= 4).all()
    kept = lin.weight != 0
    # second-order reconstruction: kept weights moved away from their dense values
    assert not torch.equal(lin.weight[kept], ref.weight[kept])
