"""Expert scoring criteria, one registry entry each (docs/formats.md); plans made from them are in
:mod:`mone_jax.planning`. A score is computed per MoE layer from its :class:`~mone_jax.stats.LayerStats`;
a high score means the expert is kept.

Two semantics (:data:`SEMANTICS`): ``exact`` (the default) scores exact statistics; ``reference``
scores as the MoNE reference code (zxgx/mode-pd) does, from its approximate per-call statistics
(the ``ref_*`` fields of :data:`~mone_jax.stats.FIELDS`); a metric defines it with ``reference``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mone_jax.errors import UserError
from mone_jax.stats import LayerStats


@dataclass(frozen=True)
class Metric:
    """``score(stats, tokens, rng) -> [E]``; ``source``: where the criterion comes from; ``reference``:
    the score under ``--semantics reference`` (None: the reference has no such metric)."""

    name: str
    score: Callable[[LayerStats, int, np.random.Generator], np.ndarray]
    source: str
    reference: Callable[[LayerStats, int, np.random.Generator], np.ndarray] | None = None


SEMANTICS = ("exact", "reference")


def check_semantics(semantics: str) -> str:
    if semantics not in SEMANTICS:
        raise UserError(f"unknown semantics '{semantics}': use one of {', '.join(SEMANTICS)}")
    return semantics


def _routing(s: LayerStats, tokens: int) -> np.ndarray:
    """Mean over all tokens of the applied routing weight."""
    return s.weight_sum / max(tokens, 1)


def _spread(s: LayerStats) -> np.ndarray:
    """L2 norm of the per-dimension standard deviation of the raw output."""
    return np.sqrt(s.var.sum(axis=1))


def _reference_spread(s: LayerStats) -> np.ndarray:
    """The reference's spread: L2 norm of the square root of its approximate variance."""
    return np.sqrt(np.maximum(s.ref_var, 0.0).sum(axis=1))


def _per_routed_token(total: np.ndarray, s: LayerStats) -> np.ndarray:
    return np.where(s.count > 0, total / np.maximum(s.count, 1), 0.0)


_METRICS = [
    Metric("mone", lambda s, n, rng: _routing(s, n) * _spread(s), "MoNE, arXiv 2507.00390",
           reference=lambda s, n, rng: _routing(s, n) * _reference_spread(s)),
    Metric("frequency", lambda s, n, rng: s.count / max(n, 1), "routed-token share"),
    Metric("routing-score", lambda s, n, rng: _routing(s, n), "MoNE's routing term alone",
           reference=lambda s, n, rng: _routing(s, n)),
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


def layer_scores(s: LayerStats, tokens: int, name: str, rng: np.random.Generator | None = None,
                 semantics: str = "exact") -> np.ndarray:
    """Score [E] of one layer's experts under metric ``name`` and ``semantics``."""
    m = metric(name)
    if check_semantics(semantics) == "reference":
        if m.reference is None:
            have = ", ".join(k for k, v in REGISTRY.items() if v.reference is not None)
            raise UserError(f"metric '{name}' has no reference semantics: use one of {have} or semantics 'exact'")
        return np.asarray(m.reference(s, tokens, rng), np.float64)
    return np.asarray(m.score(s, tokens, rng), np.float64)
