"""Damaged model files and databases are found, not used: weights that do not fit the config's
architecture, tokenizer files of the wrong shape, a crafted saved structure, a darwin level
database with a NaN, swapped or truncated block file, calibration that cannot fit in memory."""
import json
import shlex
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from prunerzero.cli import main
from prunerzero.engine.models import ModelError
from prunerzero.loading import load_model
from prunerzero.structured.database import Database, build_database, layer_file
from prunerzero.structured.units import StructureError

from tiny import saved_world, tiny_llama, token_samples

pytestmark = pytest.mark.usefixtures("own_cache")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return saved_world(tmp_path_factory.mktemp("files"))


def copy(good, tmp_path):
    shutil.copytree(good / "m", tmp_path / "m")
    return tmp_path / "m"


def apply(folder, good, *extra):
    args = shlex.split(f"apply --model {folder} --calibration {good}/t.txt --eval-data {good}/t.txt --seqlen 16 "
                       f"--nsamples 2 --eval-chunks 2 --output {folder.parent}/out") + list(extra)
    return CliRunner().invoke(main, args)


def one_error(r, fragment):
    assert r.exit_code == 2, r.output
    errors = [x for x in r.output.splitlines() if x.startswith("error")]
    assert len(errors) == 1 and fragment in errors[0], r.output
    assert not (r.output and "Traceback" in r.output)


def test_weights_missing_a_layer_are_refused(good, tmp_path):
    m = copy(good, tmp_path)
    state = load_file(m / "model.safetensors")
    save_file({k: v for k, v in state.items() if ".layers.1." not in k}, m / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelError, match="missing .*layers.1"):
        load_model(str(m))
    r = apply(m, good)
    one_error(r, "do not match its config")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type, architecture", [("gpt2", "GPT2LMHeadModel"), ("bert", "BertLMHeadModel")])
def test_a_config_naming_another_architecture_is_refused(good, tmp_path, model_type, architecture):
    m = copy(good, tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(model_type=model_type, architectures=[architecture], n_embd=64, n_layer=2, n_head=4)
    (m / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="do not match its config"):
        load_model(str(m))


def test_unexpected_extra_weights_are_refused(good, tmp_path):
    m = copy(good, tmp_path)
    state = load_file(m / "model.safetensors")
    state["model.layers.9.mlp.up_proj.weight"] = torch.zeros(4, 4)
    save_file(state, m / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="unexpected"):
        load_model(str(m))


def test_a_tokenizer_of_the_wrong_shape_is_blamed_on_the_tokenizer(good, tmp_path):
    m = copy(good, tmp_path)
    tok = json.loads((m / "tokenizer.json").read_text())
    tok["model"]["vocab"] = list(tok["model"]["vocab"])      # a list of words where a mapping belongs
    (m / "tokenizer.json").write_text(json.dumps(tok))
    one_error(apply(m, good), "cannot load the tokenizer")


def test_an_empty_vocabulary_is_named_as_such(good, tmp_path):
    m = copy(good, tmp_path)
    tok = json.loads((m / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {}
    tok["model"]["unk_token"] = None
    tok["added_tokens"] = []
    (m / "tokenizer.json").write_text(json.dumps(tok))
    r = apply(m, good)
    assert r.exit_code == 2 and "tokenizer" in r.output and "0 tokens" not in r.output, r.output


def test_calibration_that_cannot_fit_in_memory_is_refused_naming_the_option(good, tmp_path):
    r = apply(good / "m", good, "--nsamples", "100000000")
    one_error(r, "--nsamples 100000000 x --seqlen 16 needs about")
    assert "lower --nsamples" in r.output


def test_calibration_from_a_device_file_is_refused(good):
    r = CliRunner().invoke(main, ["apply", "--model", str(good / "m"), "--calibration", "/dev/zero"])
    one_error(r, "is not a regular file")


def _database(tmp_path):
    model = tiny_llama(layers=3)
    settings = {"case": "integrity"}
    db = build_database(model, token_samples(8, 32), tmp_path / "db", settings, progress=False)
    return model, settings, db


def _same(a: Database, b: Database):
    assert a.levels == b.levels
    for kind in ("attn", "mlp"):
        for layer in range(a.n_layers):
            for i in range(1, len(a.levels[kind][layer])):
                x, y = a.weights(kind, layer, i), b.weights(kind, layer, i)
                assert (x is None and y is None) or torch.equal(x, y)


def _nan(file):
    from safetensors import safe_open
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(file), metadata=meta)   # its old checksum kept: an edit, not a rebuild


@pytest.mark.parametrize("damage", [
    lambda db: _nan(layer_file(db, 1)),
    lambda db: shutil.copy(layer_file(db, 0), layer_file(db, 2)),                      # another block's file
    lambda db: layer_file(db, 1).write_bytes(layer_file(db, 1).read_bytes()[:100]),     # truncated
    lambda db: (db / "meta.json").write_text("{"),
], ids=["nan", "swapped", "truncated", "meta"])
def test_a_damaged_level_database_is_rebuilt_with_a_warning(tmp_path, damage, caplog):
    model, settings, db = _database(tmp_path)
    reference = Database(tmp_path / "db")
    damage(tmp_path / "db")
    rebuilt = build_database(model, token_samples(8, 32), tmp_path / "db", settings, progress=False)
    assert any("level database" in r.getMessage() for r in caplog.records)
    _same(rebuilt, reference)


def test_a_database_path_that_is_a_file_is_one_line(good, tmp_path):
    (tmp_path / "db").write_text("a file")
    r = CliRunner().invoke(main, ["darwin", "--output", str(tmp_path / "run"), "--database", str(tmp_path / "db")])
    one_error(r, "--database")
    assert "is a file" in r.output


@pytest.mark.parametrize("edit, fragment", [
    (lambda layers: layers[0].update(heads=[0, 499]), "heads 499"),
    (lambda layers: layers[1].update(channels=[3, 1]), "ascending"),
    (lambda layers: layers.pop(), "blocks"),
    (lambda layers: layers[0].update(kv_heads=[1]), "kv_heads"),
])
def test_a_crafted_saved_structure_is_one_line(tmp_path, edit, fragment):
    import random
    from prunerzero.structured.genome import LevelSpace
    from prunerzero.structured.shrink import STRUCTURE_FILE, load_structured, materialize, save_structured
    model, _, db = _database(tmp_path)
    space = LevelSpace.of_database(db)
    small = materialize(model, db, space.mutate(space.uniform(0.6), random.Random(0), switches=2))
    save_structured(small, tmp_path / "small")
    f = tmp_path / "small" / STRUCTURE_FILE
    spec = json.loads(f.read_text())
    edit(spec["layers"])
    f.write_text(json.dumps(spec))
    with pytest.raises(StructureError, match=fragment):
        load_structured(tmp_path / "small")
