"""Plans under any criterion of :data:`mone_jax.pruning.scoring.REGISTRY`: from calibration statistics, or for a
weights-only criterion (AIMER) from the checkpoint itself, with no calibration.

Weights-only scores stream every routed expert's gate, up and down matrices from the safetensors one
expert at a time (in float64, MXFP4 dequantized), so a model of any size is scored in the memory of
one expert and without building the model; biases are not weight matrices and are left out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mone_jax.base.errors import UserError
from mone_jax.base.stats import Stats
from mone_jax.convert.families import family, parse_config
from mone_jax.convert.load import check_quantization, expert_weights, kept_counts
from mone_jax.convert.reader import CheckpointReader, read_config
from mone_jax.pruning.planning import SCOPES, Plan, make_plan, plan_from_scores, resolve_keep
from mone_jax.pruning.scoring import metric as get_metric


def weight_scores(folder: str | Path, metric: str, *, progress: bool = True) -> dict[int, np.ndarray]:
    """{MoE layer: scores [E]} of the weights-only criterion ``metric`` on the stock checkpoint ``folder``."""
    m = get_metric(metric)
    if not m.needs_weights:
        raise UserError(f"metric '{metric}' scores calibration statistics: give a statistics file, not a model")
    raw = read_config(folder)
    cfg = parse_config(raw)
    check_quantization(raw, cfg)
    if kept_counts(folder):
        raise UserError(f"'{folder}' is already pruned: score the original model")
    fam, E = family(cfg.model_type), cfg.num_experts
    out = {}
    for layer in tqdm(cfg.moe_layer_ids, desc=f"scoring experts ({metric})", unit="layer", disable=not progress,
                      leave=False):
        with CheckpointReader(folder) as r:  # reopened per layer: the file pages read leave memory
            scores = []
            for e in range(E):
                gu, dn = expert_weights(r, fam, layer, [e], [e], E, np.float64)
                f = gu.shape[-1] // 2  # gate half, then up half
                scores.append(m.expert_score([gu[0, :, :f], gu[0, :, f:], dn[0]]))
        out[layer] = np.asarray(scores, np.float64)
    return out


def plan_for(metric: str, *, stats: Stats | None = None, model: str | Path | None = None, keep: int | None = None,
             ratio: float | None = None, scope: str = "layer", seed: int = 0, n_group: int = 1,
             semantics: str = "exact", progress: bool = True) -> Plan:
    """The plan of criterion ``metric``: from ``stats``, or from the weights of the ``model`` folder when the
    criterion reads only weights (then no statistics are needed)."""
    if get_metric(metric).needs_weights:
        if model is None:
            raise UserError(f"metric '{metric}' scores the weights: give the model folder")
        if semantics != "exact":
            raise UserError(f"metric '{metric}' has no reference semantics: use semantics 'exact'")
        resolve_keep(parse_config(read_config(model)).num_experts, keep, ratio)  # before the scoring
        if scope not in SCOPES:
            raise UserError(f"unknown scope '{scope}': use one of {', '.join(SCOPES)}")
        return plan_from_scores(weight_scores(model, metric, progress=progress), keep=keep, ratio=ratio,
                                metric=metric, scope=scope, n_group=n_group)
    if stats is None:
        raise UserError(f"metric '{metric}' scores calibration statistics: give a statistics file "
                        "(`mone-jax calibrate`)")
    return make_plan(stats, keep=keep, ratio=ratio, metric=metric, scope=scope, seed=seed, n_group=n_group,
                     semantics=semantics)
