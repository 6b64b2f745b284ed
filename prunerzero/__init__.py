"""prunerzero: evolve symbolic pruning metrics (Pruner-Zero) and structured sparsity
(DarwinLM) for large language models, and prune with them."""
from .errors import DegenerateMetricError, MetricError, MetricSyntaxError, NonFiniteScoreError, PrunerZeroError
from .language.metric import Metric, catalog


def __getattr__(name):
    # The pruning API imports transformers; load it on first use so the metric language stays light.
    lazy = {"apply_metric": "recipes", "apply_sparsegpt": "engine.prune", "PruneReport": "engine.prune",
            "perplexity": "engine.evaluate", "load_model": "loading",
            "load_text": "data", "tokenize": "data", "calibration_samples": "data", "chunks": "data",
            "run_apply": "pipeline", "calibration_for": "pipeline",
            "run_darwin": "structured.run", "DarwinConfig": "structured.config",
            "load_structured": "structured.shrink", "save_structured": "structured.shrink"}
    if name in lazy:
        import importlib
        return getattr(importlib.import_module(f".{lazy[name]}", __name__), name)
    raise AttributeError(name)

__all__ = ["Metric", "catalog", "PrunerZeroError", "MetricError", "MetricSyntaxError",
           "DegenerateMetricError", "NonFiniteScoreError", "apply_metric", "apply_sparsegpt", "PruneReport", "perplexity",
           "load_model", "load_text", "tokenize", "calibration_samples", "chunks", "run_apply", "calibration_for",
           "run_darwin", "DarwinConfig", "load_structured", "save_structured"]
__version__ = "0.1.0"
