"""Expert scoring criteria, one registry entry each (docs/formats.md); plans made from them are in
:mod:`mone_jax.pruning.planning`. A score is computed per MoE layer from its :class:`~mone_jax.base.stats.LayerStats`;
a high score means the expert is kept.

Two semantics (:data:`mone_jax.base.stats.SEMANTICS`): ``exact`` (the default) scores exact statistics; ``reference``
scores as the MoNE reference code (zxgx/mode-pd) does, from its approximate per-call statistics
(the ``ref_*`` fields of :data:`~mone_jax.base.stats.FIELDS`); a metric defines it with ``reference``.

A criterion reads either calibration statistics (``score``) or, needing no calibration, the weights
(``expert_score``: one expert's score from its gate, up and down weight matrices, which
:func:`mone_jax.convert.criteria.weight_scores` streams from the checkpoint)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mone_jax.base.errors import UserError
from mone_jax.base.stats import FIELDS, LayerStats, Stats, check_semantics


@dataclass(frozen=True)
class Metric:
    """``score(stats, tokens, rng) -> [E]``; ``source``: where the criterion comes from; ``reference``:
    the score under ``--semantics reference`` (None: the reference has no such metric); ``fields``: the
    optional statistics ``score`` reads, which an older statistics file may lack. A weights-only criterion
    has ``score`` None and ``expert_score([gate, up, down]) -> float`` instead."""

    name: str
    score: Callable[[LayerStats, int, np.random.Generator], np.ndarray] | None
    source: str
    reference: Callable[[LayerStats, int, np.random.Generator], np.ndarray] | None = None
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


def _reference_spread(s: LayerStats) -> np.ndarray:
    """The reference's spread: L2 norm of the square root of its approximate variance."""
    return np.sqrt(np.maximum(s.ref_var, 0.0).sum(axis=1))


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
    Metric("mone", lambda s, n, rng: _routing(s, n) * _spread(s), "MoNE, arXiv 2507.00390",
           reference=lambda s, n, rng: _routing(s, n) * _reference_spread(s)),
    Metric("frequency", lambda s, n, rng: s.count / max(n, 1), "routed-token share"),
    Metric("routing-score", lambda s, n, rng: _routing(s, n), "MoNE's routing term alone",
           reference=lambda s, n, rng: _routing(s, n)),
    Metric("variance", lambda s, n, rng: _spread(s), "MoNE's variance term alone"),
    Metric("reap", lambda s, n, rng: _per_routed_token(s.reap_sum, s), "REAP, arXiv 2510.13999",
           fields=("reap_sum",)),
    Metric("man", lambda s, n, rng: _per_routed_token(s.norm_sum, s), "mean activation norm, arXiv 2606.15716",
           fields=("norm_sum",)),
    Metric("msan", lambda s, n, rng: _mean_sq_norm(s), "mean squared activation norm, arXiv 2606.15716"),
    Metric("aimer", None, "AIMER, arXiv 2603.18492 (weights only; the highest ratio is pruned first)",
           expert_score=lambda mats: -aimer_ratio(mats)),
    Metric("random", lambda s, n, rng: rng.random(s.count.shape[0]), "seeded uniform baseline"),
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


def layer_scores(s: LayerStats, tokens: int, name: str, rng: np.random.Generator | None = None,
                 semantics: str = "exact") -> np.ndarray:
    """Score [E] of one layer's experts under the statistics metric ``name`` and ``semantics``."""
    m = metric(name)
    if m.needs_weights:
        raise UserError(f"metric '{name}' scores the weights, not calibration statistics: give the model folder")
    if check_semantics(semantics) == "reference":
        if m.reference is None:
            have = ", ".join(k for k, v in REGISTRY.items() if v.reference is not None)
            raise UserError(f"metric '{name}' has no reference semantics: use one of {have} or semantics 'exact'")
        return np.asarray(m.reference(s, tokens, rng), np.float64)
    return np.asarray(m.score(s, tokens, rng), np.float64)
