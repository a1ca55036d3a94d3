"""Expert redundancy scores (docs/formats.md); the plan made from them is in :mod:`mone_jax.planning`."""

from __future__ import annotations

import numpy as np

from mone_jax.errors import UserError
from mone_jax.stats import LayerStats

METRICS = ("mone", "frequency", "routing-score", "variance", "reap", "random")


def layer_scores(s: LayerStats, tokens: int, metric: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """Score [E] of one layer's experts; a high score means the expert is kept."""
    routing = s.weight_sum / max(tokens, 1)
    spread = np.sqrt(s.var.sum(axis=1))
    if metric == "mone":
        return routing * spread
    if metric == "frequency":
        return s.count / max(tokens, 1)
    if metric == "routing-score":
        return routing
    if metric == "variance":
        return spread
    if metric == "reap":
        return np.where(s.count > 0, s.reap_sum / np.maximum(s.count, 1), 0.0)
    if metric == "random":
        return rng.random(s.count.shape[0])
    raise UserError(f"unknown metric '{metric}': use one of {', '.join(METRICS)}")
