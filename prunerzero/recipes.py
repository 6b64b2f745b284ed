"""`apply_metric` for users: a recipe (metric, update, allocation) applied to a model, with an
allocation search (allocation="search" or an AllocationSearchConfig) run first, here above the
engine, so the engine never calls into a search. The engine's own apply_metric takes the
allocation this finds (a LayerSparsity)."""
from __future__ import annotations

import torch

from . import progress
from .engine import prune
from .engine.allocation import LayerSparsity
from .engine.calibration import compute_g
from .engine.models import all_prunable
from .language.metric import Metric
from .language.space import recipe_defaults


def apply_metric(model, metric, sparsity: float = 0.5, structure: str = "unstructured",
                 calibration: torch.Tensor | None = None, sequential: bool = True,
                 grads: dict | None = None, x_norms: dict | None = None, curvature: dict | None = None,
                 group: str | None = None, update=None, allocation=None, progress: bool = True,
                 log=progress.log) -> prune.PruneReport:
    """Prune `model` in place with `metric` (text, catalog name or Metric) and report; the
    arguments are engine.prune.apply_metric's, and allocation may also be "search" or an
    AllocationSearchConfig (its settings and run folder): each layer's sparsity is then found by
    evolution first (search/allocation.py), its lines going to `log`."""
    m = Metric.parse(metric) if not isinstance(metric, Metric) else metric
    update, allocation = recipe_defaults(m.name, update, allocation)
    if _is_search(allocation):
        from .search.allocation import AllocationSearchConfig, search_allocation
        if calibration is None:
            raise prune.PruneError("an allocation search needs calibration samples")
        if "G" in m.terminals and grads is None:  # computed once, for the search and the prune
            grads = compute_g(model, calibration)
        settings = allocation if isinstance(allocation, AllocationSearchConfig) else AllocationSearchConfig()
        per_layer, report = search_allocation(model, all_prunable(model), m, calibration, sparsity, settings,
                                              settings.run, log, progress,
                                              {"G": grads, "X": x_norms, "H": curvature})
        allocation = LayerSparsity(per_layer, report)
    return prune.apply_metric(model, m, sparsity, structure, calibration, sequential, grads, x_norms, curvature,
                              group, update, allocation, progress)


def _is_search(allocation) -> bool:
    return allocation == "search" or not isinstance(allocation, (str, LayerSparsity, type(None)))
