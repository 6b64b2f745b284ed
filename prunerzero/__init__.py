"""prunerzero: evolve symbolic pruning metrics (Pruner-Zero) and structured sparsity
(DarwinLM) for large language models, and prune with them."""
from .errors import (DegenerateMetricError, MetricError, MetricSyntaxError, NonFiniteScoreError,
                     PrunerZeroError)
from .metric import Metric, catalog

__all__ = ["Metric", "catalog", "PrunerZeroError", "MetricError", "MetricSyntaxError",
           "DegenerateMetricError", "NonFiniteScoreError"]
__version__ = "0.1.0"
