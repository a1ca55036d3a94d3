"""Expert scoring criteria, one registry entry each (docs/formats.md); plans made from them are in
:mod:`mone_jax.planning`. A high score means the expert is kept.

A criterion reads either calibration statistics (``score``: one MoE layer's scores from its
:class:`~mone_jax.stats.LayerStats`) or, needing no calibration, the weights (``expert_score``: one
expert's score from its gate, up and down weight matrices; the HF layer streams them from the
checkpoint, :func:`mone_jax.convert.expert_weights.weight_scores`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mone_jax.errors import UserError
from mone_jax.stats import FIELDS, LayerStats, Stats


@dataclass(frozen=True)
class Metric:
    """One criterion: ``source`` says where it comes from. Exactly one of ``score(stats, tokens, rng) -> [E]``
    (``fields``: the optional statistics it reads, which an older statistics file may lack) and
    ``expert_score([gate, up, down]) -> float`` (weights only)."""

    name: str
    source: str
    score: Callable[[LayerStats, int, np.random.Generator], np.ndarray] | None = None
    fields: tuple[str, ...] = ()
    expert_score: Callable[[Sequence[np.ndarray]], float] | None = None

    @property
    def needs_weights(self) -> bool:
        """True for a weights-only criterion: no calibration statistics are read."""
        return self.expert_score is not None


def _routing(s: LayerStats, tokens: int) -> np.ndarray:
    """Mean over all tokens of the applied routing weight."""
    return s.weight_sum / max(tokens, 1)


def _spread(s: LayerStats) -> np.ndarray:
    """L2 norm of the per-dimension standard deviation of the raw output."""
    return np.sqrt(s.var.sum(axis=1))


def _per_routed_token(total: np.ndarray, s: LayerStats) -> np.ndarray:
    return np.where(s.count > 0, total / np.maximum(s.count, 1), 0.0)


def _mean_sq_norm(s: LayerStats) -> np.ndarray:
    """Mean over routed tokens of ||raw output||_2^2, exactly: (n ||mean||^2 + sum_d m2_d) / n."""
    return np.where(s.count > 0, (s.mean**2).sum(axis=1) + s.m2.sum(axis=1) / np.maximum(s.count, 1), 0.0)


def aimer_ratio(matrices: Sequence[np.ndarray]) -> float:
    """AIMER's ratio mean(|w|) / sqrt(mean(w^2)) over every entry of an expert's weight matrices, in float64.

    It lies in (0, 1]; AIMER prunes the highest ratios first. An all-zero expert counts as 1 (pruned first)."""
    n = sum(m.size for m in matrices)
    mats = [np.asarray(m, np.float64) for m in matrices]
    abs_sum = sum(float(np.abs(m).sum()) for m in mats)
    sq_sum = sum(float(np.square(m).sum()) for m in mats)
    return abs_sum / n / np.sqrt(sq_sum / n) if sq_sum > 0 else 1.0


_METRICS = [
    Metric("mone", "MoNE, arXiv 2507.00390", lambda s, n, rng: _routing(s, n) * _spread(s)),
    Metric("frequency", "routed-token share", lambda s, n, rng: s.count / max(n, 1)),
    Metric("routing-score", "MoNE's routing term alone", lambda s, n, rng: _routing(s, n)),
    Metric("variance", "MoNE's variance term alone", lambda s, n, rng: _spread(s)),
    Metric("reap", "REAP, arXiv 2510.13999", lambda s, n, rng: _per_routed_token(s.reap_sum, s), ("reap_sum",)),
    Metric("man", "mean activation norm, arXiv 2606.15716", lambda s, n, rng: _per_routed_token(s.norm_sum, s),
           ("norm_sum",)),
    Metric("msan", "mean squared activation norm, arXiv 2606.15716", lambda s, n, rng: _mean_sq_norm(s)),
    Metric("aimer", "AIMER, arXiv 2603.18492 (weights only; the highest ratio is pruned first)",
           expert_score=lambda mats: -aimer_ratio(mats)),
    Metric("random", "seeded uniform baseline", lambda s, n, rng: rng.random(s.count.shape[0])),
]
REGISTRY: dict[str, Metric] = {m.name: m for m in _METRICS}
METRICS = tuple(REGISTRY)


def metric(name: str) -> Metric:
    if name not in REGISTRY:
        raise UserError(f"unknown metric '{name}': use one of {', '.join(METRICS)}")
    return REGISTRY[name]


def check_stats_metric(name: str, stats: Stats) -> Metric:
    """The statistics criterion ``name``, after checking that ``stats`` hold every statistic it reads."""
    m = metric(name)
    if m.needs_weights:
        raise UserError(f"metric '{name}' scores the weights, not calibration statistics: give the model folder")
    if lacking := [f for f in m.fields if f in stats.missing]:
        key = next(f.key for f in FIELDS if f.name == lacking[0])
        raise UserError(f"metric '{name}' needs the statistic '{key}', which this statistics file (written by an "
                        "older mone-jax) lacks: recalibrate with `mone-jax calibrate`")
    return m


def layer_scores(s: LayerStats, tokens: int, name: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """Score [E] of one layer's experts under the statistics criterion ``name``."""
    m = metric(name)
    if m.needs_weights:
        raise UserError(f"metric '{name}' scores the weights, not calibration statistics: give the model folder")
    return np.asarray(m.score(s, tokens, rng), np.float64)
