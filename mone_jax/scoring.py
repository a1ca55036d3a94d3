"""Expert redundancy scores and the keep / novice plan (docs/formats.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mone_jax.errors import UserError
from mone_jax.stats import LayerStats, Stats

METRICS = ("mone", "frequency", "routing-score", "variance", "reap", "random")
SCOPES = ("layer", "model")


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


def resolve_keep(num_experts: int, keep: int | None, ratio: float | None) -> int:
    """Experts kept per layer from ``--keep N`` or ``--ratio R`` (fraction pruned)."""
    if (keep is None) == (ratio is None):
        raise UserError("give exactly one of --keep N or --ratio R")
    if ratio is not None:
        if not 0 <= ratio < 1:
            raise UserError(f"--ratio must lie in [0, 1) (fraction of experts pruned), got {ratio}")
        keep = max(1, num_experts - int(round(ratio * num_experts)))
    if not 0 < keep <= num_experts:
        raise UserError(f"--keep must lie in [1, {num_experts}] (the number of routed experts), got {keep}")
    return int(keep)


def make_plan(stats: Stats, *, keep: int | None = None, ratio: float | None = None, metric: str = "mone",
              scope: str = "layer", seed: int = 0) -> dict:
    """Keep the N best-scored experts per layer (scope ``layer``) or round(N * layers) overall."""
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}': use one of {', '.join(METRICS)}")
    if scope not in SCOPES:
        raise UserError(f"unknown scope '{scope}': use one of {', '.join(SCOPES)}")
    E = stats.num_experts
    n = resolve_keep(E, keep, ratio)
    rng = np.random.default_rng(seed)
    ids = sorted(stats.layers)
    scores = {i: np.asarray(layer_scores(stats.layers[i], stats.tokens, metric, rng), np.float64) for i in ids}
    for i, sc in scores.items():
        if not np.all(np.isfinite(sc)):
            raise UserError(f"scores of layer {i} contain NaN/Inf: the statistics are corrupt; recalibrate")
    if scope == "layer":
        kept = {i: _top(scores[i], n) for i in ids}
    else:
        kept = _model_scope(scores, ids, n)
    layers = {
        str(i): {"kept": sorted(kept[i]), "novices": sorted(set(range(E)) - set(kept[i])),
                 "scores": [float(x) for x in scores[i]]}
        for i in ids
    }
    return {"metric": metric, "scope": scope, "keep": n, "layers": layers}


def _top(score: np.ndarray, n: int) -> list[int]:
    order = np.lexsort((np.arange(score.size), -score))  # score descending, lower index first
    return [int(e) for e in order[:n]]


def _model_scope(scores: dict[int, np.ndarray], ids: list[int], n: int) -> dict[int, list[int]]:
    total = int(round(n * len(ids)))
    flat = [(-float(scores[i][e]), i, e) for i in ids for e in range(scores[i].size)]
    flat.sort()
    kept = {i: [_top(scores[i], 1)[0]] for i in ids}  # at least one expert per layer
    budget = total - len(ids)
    for _, i, e in flat:
        if budget <= 0:
            break
        if e not in kept[i]:
            kept[i].append(e)
            budget -= 1
    return kept


def save_plan(plan: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(plan, indent=1))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load_plan(path: str | Path) -> dict:
    path = Path(path)
    try:
        plan = json.loads(path.read_text())
        layers = plan["layers"]
        for v in layers.values():
            v["kept"], v["novices"]  # noqa: B018 - presence check
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"plan file '{path}' does not exist: run `mone-jax plan` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"'{path}' is not a valid plan file ({e}): recreate it with `mone-jax plan`") from None
    return plan
