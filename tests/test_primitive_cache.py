"""Dense primitives are cached on disk: a second run with the same settings skips the work."""
import torch

from prunerzero import calibration, pipeline
from prunerzero.metric import Metric

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
