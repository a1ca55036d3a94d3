"""Expert scoring criteria, one registry entry each (docs/formats.md); plans made from them are in
:mod:`mone_jax.planning`. A score is computed per MoE layer from its :class:`~mone_jax.stats.LayerStats`;
a high score means the expert is kept."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mone_jax.errors import UserError
from mone_jax.stats import LayerStats


@dataclass(frozen=True)
class Metric:
    """``score(stats, tokens, rng) -> [E]``; ``source``: where the criterion comes from."""

    name: str
    score: Callable[[LayerStats, int, np.random.Generator], np.ndarray]
    source: str


def _routing(s: LayerStats, tokens: int) -> np.ndarray:
    """Mean over all tokens of the applied routing weight."""
    return s.weight_sum / max(tokens, 1)


def _spread(s: LayerStats) -> np.ndarray:
    """L2 norm of the per-dimension standard deviation of the raw output."""
    return np.sqrt(s.var.sum(axis=1))


def _per_routed_token(total: np.ndarray, s: LayerStats) -> np.ndarray:
    return np.where(s.count > 0, total / np.maximum(s.count, 1), 0.0)


_METRICS = [
    Metric("mone", lambda s, n, rng: _routing(s, n) * _spread(s), "MoNE, arXiv 2507.00390"),
    Metric("frequency", lambda s, n, rng: s.count / max(n, 1), "routed-token share"),
    Metric("routing-score", lambda s, n, rng: _routing(s, n), "MoNE's routing term alone"),
    Metric("variance", lambda s, n, rng: _spread(s), "MoNE's variance term alone"),
    Metric("reap", lambda s, n, rng: _per_routed_token(s.reap_sum, s), "REAP, arXiv 2510.13999"),
    Metric("random", lambda s, n, rng: rng.random(s.count.shape[0]), "seeded uniform baseline"),
]
REGISTRY: dict[str, Metric] = {m.name: m for m in _METRICS}
METRICS = tuple(REGISTRY)


def metric(name: str) -> Metric:
    if name not in REGISTRY:
        raise UserError(f"unknown metric '{name}': use one of {', '.join(METRICS)}")
    return REGISTRY[name]


def layer_scores(s: LayerStats, tokens: int, name: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """Score [E] of one layer's experts under metric ``name``."""
    return np.asarray(metric(name).score(s, tokens, rng), np.float64)
