"""`apply_metric` for users: a recipe (metric, update, allocation) applied to a model, with an
allocation search (allocation="search" or an AllocationSearchConfig) run first, here above the
engine, so the engine never calls into a search. The engine's own apply_metric takes the
allocation this finds (a LayerSparsity)."""
from __future__ import annotations

import torch

from .progress import saying
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
                 log=None) -> prune.PruneReport:
    """Prune `model` in place with `metric` (text, catalog name or Metric) and report; the
    arguments are engine.prune.apply_metric's, and allocation may also be "search" or an
    AllocationSearchConfig (its settings and run folder): each layer's sparsity is then found by
    evolution first (search/allocation.py), its lines going to `log` (None: where the run this
    call is part of sends its lines; the logger's INFO lines outside any)."""
    m = Metric.parse(metric) if not isinstance(metric, Metric) else metric
    update, allocation = recipe_defaults(m.name, update, allocation)
    if _is_search(allocation):
        from .search.allocation import AllocationSearchConfig, search_allocation
        if calibration is None:
            raise prune.PruneError("an allocation search needs calibration samples")
        if "G" in m.terminals and grads is None:  # computed once, for the search and the prune
            grads = compute_g(model, calibration)
        settings = allocation if isinstance(allocation, AllocationSearchConfig) else AllocationSearchConfig()
        with saying(log):
            per_layer, report = search_allocation(model, all_prunable(model), m, calibration, sparsity, settings,
                                                  settings.run, progress, {"G": grads, "X": x_norms, "H": curvature})
        allocation = LayerSparsity(per_layer, report)
    elif isinstance(allocation, str) and allocation.endswith(".json"):
        allocation = allocation_from_file(allocation, all_prunable(model))
    return prune.apply_metric(model, m, sparsity, structure, calibration, sequential, grads, x_norms, curvature,
                              group, update, allocation, progress)


def allocation_from_file(path: str, layers: dict) -> LayerSparsity:
    """A per-layer sparsity saved by a search (RUN/allocation_N.json of `evolve --search
    allocation`, or an allocation search's allocation.json), checked against the model's layers."""
    import json
    import math
    from pathlib import Path
    from .checks import SettingsError
    try:
        data = json.loads(Path(path).read_text())
        sparsity = {str(k): float(v) for k, v in data["sparsity"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SettingsError(f"--allocation {path}: not a per-layer sparsity file ({type(e).__name__}: {e})") from None
    missing, extra = sorted(set(layers) - set(sparsity)), sorted(set(sparsity) - set(layers))
    if missing or extra:
        what = f"has no sparsity for {missing[0]}" if missing else f"names {extra[0]}, which this model lacks"
        raise SettingsError(f"--allocation {path} {what}: it was found for another model")
    bad = [k for k, v in sparsity.items() if not (math.isfinite(v) and 0 <= v < 1)]
    if bad:
        raise SettingsError(f"--allocation {path}: the sparsity of {bad[0]} is {sparsity[bad[0]]}, not in [0, 1)")
    return LayerSparsity(sparsity, dict(data.get("report") or {}, kind="file", file=str(path)))


def _is_search(allocation) -> bool:
    return allocation == "search" or not isinstance(allocation, (str, LayerSparsity, type(None)))
