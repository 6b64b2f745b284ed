"""Dense primitives are cached on disk: a second run with the same settings skips the work, and
an entry that is damaged, edited or written for other layers is reported and computed again."""
import pytest
import torch

from prunerzero.engine import calibration
from prunerzero import pipeline
from prunerzero.progress import saying
from prunerzero.engine.models import all_prunable
from prunerzero.language.metric import Metric

from tiny import tiny_llama, token_samples


def test_second_run_loads_g_and_x_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNERZERO_CACHE", str(tmp_path))
    calls = {"G": 0, "X": 0}

    def counting(kind, real):
        def f(*a, **k):
            calls[kind] += 1
            return real(*a, **k)
        return f

    monkeypatch.setattr(pipeline, "compute_g", counting("G", calibration.compute_g))
    monkeypatch.setattr(pipeline, "compute_x", counting("X", calibration.compute_x))
    model, samples = tiny_llama(), token_samples()
    metric = Metric.parse("gblm")
    settings = dict(model="tiny", nsamples=4, seqlen=32, seed=0)
    g1, x1, _ = pipeline.dense_primitives(model, metric, samples, settings, sequential=False)
    g2, x2, _ = pipeline.dense_primitives(model, metric, samples, settings, sequential=False)
    assert calls == {"G": 1, "X": 1}
    assert all(torch.equal(g1[k], g2[k]) for k in g1) and all(torch.equal(x1[k], x2[k]) for k in x1)
    pipeline.dense_primitives(model, metric, samples, {**settings, "seed": 1}, sequential=False)
    assert calls == {"G": 2, "X": 2}  # other settings: computed again
    _, x_seq, _ = pipeline.dense_primitives(model, metric, samples, settings, sequential=True)
    assert x_seq is None  # sequential pruning recomputes X block by block


def _damage_truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _damage_empty(path):
    path.write_bytes(b"")


def _damage_garbage(path):
    path.write_bytes(bytes(range(256)) * 64)


def _damage_edit(path):
    """A valid file, its metadata kept, one value changed: only the checksum can tell."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] += 1.0
    save_file(tensors, str(path), metadata=meta)


def _damage_unchecked(path):
    """What an older prunerzero wrote: the settings but no checksum."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={"settings": meta["settings"]})


@pytest.mark.parametrize("damage, why", [(_damage_truncate, "unreadable"), (_damage_empty, "unreadable"),
                                         (_damage_garbage, "unreadable"), (_damage_edit, "does not match its checksum"),
                                         (_damage_unchecked, "no checksum")])
def test_a_damaged_cache_entry_is_reported_discarded_and_recomputed(tmp_path, monkeypatch, damage, why):
    monkeypatch.setenv("PRUNERZERO_CACHE", str(tmp_path))
    model, samples = tiny_llama(), token_samples()
    names = list(all_prunable(model))
    settings = dict(model="tiny", nsamples=4, seqlen=32, seed=0)
    fresh = calibration.cached("G", settings, lambda: calibration.compute_g(model, samples), names=names)
    path = calibration.cache_path("G", settings)
    damage(path)
    lines, calls = [], []

    def compute():
        calls.append(1)
        return calibration.compute_g(model, samples)
    with saying(lines.append):
        again = calibration.cached("G", settings, compute, names=names)
    assert calls == [1] and len(lines) == 1 and why in lines[0] and str(path) in lines[0]
    assert all(torch.equal(fresh[k], again[k]) for k in names)
    # the entry was replaced by a good one: the next run trusts it without computing
    with saying(lines.append):
        third = calibration.cached("G", settings, compute, names=names)
    assert calls == [1] and len(lines) == 1 and all(torch.equal(fresh[k], third[k]) for k in names)


def test_an_entry_for_other_layers_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNERZERO_CACHE", str(tmp_path))
    model, samples = tiny_llama(), token_samples()
    settings = dict(model="tiny", nsamples=4, seqlen=32, seed=0)
    calibration.cached("X", settings, lambda: calibration.compute_x(model, samples))
    other = list(all_prunable(tiny_llama(layers=3)))
    lines = []
    with saying(lines.append):
        x = calibration.cached("X", settings, lambda: calibration.compute_x(tiny_llama(layers=3), samples),
                               names=other)
    assert set(x) == set(other) and "layers" in lines[0]
