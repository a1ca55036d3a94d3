"""The keep / novice plan (docs/formats.md): made from scores, read, written, validated once."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mone_jax.base.errors import UserError
from mone_jax.base.files import atomic_write_text
from mone_jax.base.stats import check_semantics
from mone_jax.pruning.scoring import check_stats_metric, layer_scores
from mone_jax.pruning.scoring import metric as get_metric

if TYPE_CHECKING:
    from mone_jax.base.config import ModelConfig
    from mone_jax.base.stats import Stats

SCOPES = ("layer", "model")
GREEDY = "greedy"  # the scope of a plan searched on validation loss (mone_jax.evaluate.greedy), prune only
DISTILLED = {  # fits by distillation (mone_jax.evaluate.distill.FITTED): what each fits, in words
    "kd": "novices, MoE routers and MoE-input norms",
    "kd-down": "novices, MoE routers, MoE-input norms and kept experts' down projections",
}
FITS = ("weighted", *DISTILLED)  # --fit: novices sum g^2 y / sum g^2 (stats.LayerStats.novice_means); distillation
NO_FIT = "none"  # the --fit / --fits value of plain means (a candidate among fits)
MODES = ("substitute", "drop")
# the word users see is the export format's: novices "substitution" (the old mode name "substitute" still works)
MODE_NAMES = {"substitution": "substitute", "substitute": "substitute", "drop": "drop"}
_REMAKE = "recreate it with `mone-jax plan`"


@dataclass(frozen=True)
class LayerPlan:
    """One MoE layer: kept and novice expert ids (original numbering, ascending) and optional scores [E]."""

    kept: tuple[int, ...]
    novices: tuple[int, ...]
    scores: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Plan:
    """Which experts each MoE layer keeps; ``layers`` maps the HF layer index to its :class:`LayerPlan`."""

    metric: str | None
    scope: str | None
    keep: int | None
    layers: dict[int, LayerPlan]
    semantics: str = "exact"  # stats.SEMANTICS: how scores, thresholds and novices were / are made
    selection: dict | None = None  # --metric auto: every candidate's validation loss and the chosen one
    precision: str | None = None  # the matmul precision of the statistics scored (their meta), when recorded
    search: dict | None = None  # --scope greedy: evaluations spent, per-layer counts, each step's loss
    fit: dict | None = None  # --fit: {"method": "weighted", ...validation loss before / after where measured}

    @property
    def fit_method(self) -> str | None:
        """How the statistics give the novices: ``weighted``, or None for the plain means (also the start of a
        ``kd`` fit, whose tensors only its export holds)."""
        return "weighted" if self.fit is not None and self.fit.get("method") == "weighted" else None

    @classmethod
    def from_dict(cls, d: dict | Plan) -> Plan:
        """The plan of a JSON object (a :class:`Plan` is returned as is); UserError if malformed."""
        if isinstance(d, Plan):
            return d
        layers = d.get("layers") if isinstance(d, dict) else None
        if not isinstance(layers, dict) or not layers:
            raise UserError(f"the plan has no 'layers' object mapping layer ids to kept / novices: {_REMAKE}")
        out = {}
        for key, entry in layers.items():
            try:
                if not isinstance(entry, dict):
                    raise TypeError
                kept, nov = (_ids(entry[f]) for f in ("kept", "novices"))
                scores = entry.get("scores")
                scores = None if scores is None else tuple(float(x) for x in scores)
                out[int(key)] = LayerPlan(kept, nov, scores)
            except (KeyError, TypeError, ValueError, OverflowError):
                raise UserError(f"plan layer '{key}' is malformed: it needs integer 'kept' and 'novices' lists; "
                                f"{_REMAKE}") from None
        keep = d.get("keep")
        selection = d.get("selection") if isinstance(d.get("selection"), dict) else None
        semantics = d.get("semantics") or "exact"
        if semantics not in ("exact", "reference"):
            raise UserError(f"the plan's semantics '{semantics}' is unknown (exact, reference): {_REMAKE}")
        precision = d.get("precision") if isinstance(d.get("precision"), str) else None
        search = d.get("search") if isinstance(d.get("search"), dict) else None
        fit = d.get("fit")
        if fit is not None and (not isinstance(fit, dict) or fit.get("method") not in FITS):
            raise UserError(f"the plan's fit {fit!r} is unknown (a fit method: {', '.join(FITS)}): {_REMAKE}")
        return cls(d.get("metric"), d.get("scope"), keep if isinstance(keep, int) else None, dict(sorted(out.items())),
                   semantics, selection, precision, search, fit)

    def to_dict(self) -> dict:
        """The JSON layout of docs/formats.md (layer keys as strings)."""
        layers = {}
        for i, lp in self.layers.items():
            layers[str(i)] = {"kept": list(lp.kept), "novices": list(lp.novices)}
            if lp.scores is not None:
                layers[str(i)]["scores"] = list(lp.scores)
        head = {"metric": self.metric, "scope": self.scope, "keep": self.keep}
        if self.semantics != "exact":  # exact plans keep the layout older readers know
            head["semantics"] = self.semantics
        if self.precision is not None:
            head["precision"] = self.precision
        out = {**head, "layers": layers}
        if self.search is not None:
            out["search"] = self.search
        if self.fit is not None:  # plans without a fit keep their layout
            out["fit"] = self.fit
        return out if self.selection is None else {**out, "selection": self.selection}

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (FileNotFoundError, IsADirectoryError):
            raise UserError(f"plan file '{path}' does not exist: run `mone-jax plan` first") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"'{path}' is not a valid plan file ({e}): {_REMAKE}") from None
        try:
            return cls.from_dict(d)
        except UserError as e:
            raise UserError(f"'{path}' is not a valid plan file: {e}") from None

    def save(self, path: str | Path) -> None:
        """Write atomically (a temporary sibling renamed into place)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    def validate(self, cfg: ModelConfig, mode: str = "substitute") -> Plan:
        """``self`` if it fits the model ``cfg`` and prune ``mode`` ("substitute" or "drop"), else UserError."""
        mode = prune_mode(mode)
        moe = cfg.moe_layer_ids
        if extra := sorted(set(self.layers) - set(moe)):
            raise UserError(f"plan layer {extra[0]} is not a MoE layer of this model (MoE layers {moe}): "
                            "make the plan from this model's statistics")
        if missing := sorted(set(moe) - set(self.layers)):
            raise UserError(f"the plan lacks MoE layers {missing} of this model: make the plan from this model's "
                            "statistics")
        E = cfg.num_experts
        for i, lp in self.layers.items():
            if not lp.kept or sorted(lp.kept + lp.novices) != list(range(E)):
                raise UserError(f"plan layer {i}: kept and novices must partition experts 0..{E - 1} exactly once, "
                                "with at least one kept: the plan does not match this model")
            if lp.scores is not None and len(lp.scores) != E:
                raise UserError(f"plan layer {i} has {len(lp.scores)} scores for {E} experts: {_REMAKE}")
        if mode == "drop":
            sizes = sorted({len(lp.kept) for lp in self.layers.values()})
            if len(sizes) > 1:
                raise UserError(f"drop mode needs the same keep count in every layer, the plan has {sizes}: "
                                "use scope 'layer' or format 'substitution'")
            check_drop_keep(cfg, sizes[0])
            size = E // cfg.n_group
            for i, lp in self.layers.items():
                per = np.bincount(np.asarray(lp.kept) // size, minlength=cfg.n_group)
                if cfg.n_group > 1 and len(set(per.tolist())) > 1:
                    raise UserError(f"plan layer {i} keeps {per.tolist()} experts in the router's {cfg.n_group} "
                                    "groups: drop mode needs the same number in every group; make the plan for "
                                    "format 'drop' or use format 'substitution'")
        return self


def prune_mode(name: str) -> str:
    """The internal mode ("substitute" or "drop") of a mode name; UserError for an unknown one."""
    if name not in MODE_NAMES:
        raise UserError(f"unknown prune mode '{name}': use 'substitution' (novices) or 'drop'")
    return MODE_NAMES[name]


def check_drop_keep(cfg: ModelConfig, keep: int) -> None:
    """UserError unless dropping to ``keep`` experts per layer leaves a router that still works."""
    if keep < cfg.top_k:
        raise UserError(f"drop mode must keep at least top-k = {cfg.top_k} experts per layer (got {keep}): "
                        "keep more experts")
    if cfg.n_group <= 1:
        return
    if keep % cfg.n_group:
        raise UserError(f"drop mode must keep a multiple of the router's n_group = {cfg.n_group} experts per layer "
                        f"(got {keep}): change the keep count or use format 'substitution'")
    per = keep // cfg.n_group
    least = 2 if cfg.group_score == "top2" else 1
    if per * min(cfg.topk_group, cfg.n_group) < cfg.top_k or per < least:
        raise UserError(f"drop mode keeps {per} experts in each of the router's {cfg.n_group} groups, too few for "
                        f"top-k = {cfg.top_k} from {cfg.topk_group} groups (and at least {least} per group): "
                        "keep more experts or use format 'substitution'")


def _ids(values) -> tuple[int, ...]:
    """Sorted expert ids of a JSON list (booleans, floats and strings refused)."""
    if not isinstance(values, (list, tuple)):
        raise TypeError
    if not all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in values):
        raise TypeError
    return tuple(sorted(int(e) for e in values))


def resolve_keep(num_experts: int, keep: int | None, ratio: float | None) -> int:
    """Experts kept per layer from ``--keep N`` or ``--ratio R`` (fraction pruned)."""
    if (keep is None) == (ratio is None):
        raise UserError("give exactly one of keep (experts kept per layer) or ratio (fraction pruned)")
    if ratio is not None:
        if not 0 <= ratio < 1:
            raise UserError(f"ratio must lie in [0, 1) (fraction of experts pruned), got {ratio}")
        keep = max(1, num_experts - int(round(ratio * num_experts)))
    if not 0 < keep <= num_experts:
        raise UserError(f"keep must lie in [1, {num_experts}] (the number of routed experts), got {keep}")
    return int(keep)


def make_plan(stats: Stats, *, keep: int | None = None, ratio: float | None = None, metric: str = "mone",
              scope: str = "layer", seed: int = 0, n_group: int = 1, semantics: str = "exact") -> Plan:
    """Keep the N best-scored experts per layer (scope ``layer``) or round(N * layers) overall.

    ``n_group > 1`` (a drop plan for a group-limited router): the N / n_group best-scored experts of each
    contiguous group of expert ids, so that every group keeps the same number. ``semantics="reference"``:
    scores, thresholds and novices as the MoNE reference makes them (:func:`_reference_kept`)."""
    check_stats_metric(metric, stats)  # known, reads statistics, and these hold the ones it reads
    check_semantics(semantics)
    if semantics == "reference" and stats.meta.get("semantics") != "reference":
        raise UserError("reference semantics need statistics calibrated with semantics 'reference' "
                        "(these hold exact statistics only): recalibrate with semantics 'reference'")
    if semantics == "reference" and n_group > 1:
        raise UserError("the reference has no drop plan for a router with expert groups: use semantics 'exact'")
    if scope not in SCOPES:
        raise UserError(f"unknown scope '{scope}': use one of {', '.join(SCOPES)}")
    E = stats.num_experts
    n = resolve_keep(E, keep, ratio)
    if n_group > 1 and (scope != "layer" or n % n_group or E % n_group):
        raise UserError(f"a plan for a router with {n_group} expert groups keeps the same number in every group: "
                        f"use scope 'layer' and a keep count that divides by {n_group} (got {n}, scope {scope})")
    rng = np.random.default_rng(seed)
    ids = sorted(stats.layers)
    scores = {i: np.asarray(layer_scores(stats.layers[i], stats.tokens, metric, rng, semantics), np.float64)
              for i in ids}
    for i, sc in scores.items():
        if not np.all(np.isfinite(sc)):
            raise UserError(f"scores of layer {i} contain NaN/Inf: the statistics are corrupt; recalibrate")
    kept = _reference_kept(scores, ids, n, scope) if semantics == "reference" else _select(scores, n, scope, n_group)
    return replace(_plan(scores, kept, metric, scope, n, semantics), precision=stats.meta.get("precision"))


def plan_from_scores(scores: dict[int, np.ndarray], *, keep: int | None = None, ratio: float | None = None,
                     metric: str = "mone", scope: str = "layer", n_group: int = 1) -> Plan:
    """The plan of precomputed scores {MoE layer: [E]} of criterion ``metric`` (a weights-only one): the N
    best-scored experts per layer (scope ``layer``; ``n_group``: per group as in :func:`make_plan`) or
    round(N * layers) overall, ties to the lower expert index."""
    get_metric(metric)  # known
    if scope not in SCOPES:
        raise UserError(f"unknown scope '{scope}': use one of {', '.join(SCOPES)}")
    scores = {i: np.asarray(scores[i], np.float64) for i in sorted(scores)}
    E = next(iter(scores.values())).size
    n = resolve_keep(E, keep, ratio)
    if n_group > 1 and (scope != "layer" or n % n_group or E % n_group):
        raise UserError(f"a plan for a router with {n_group} expert groups keeps the same number in every group: "
                        f"use scope 'layer' and a keep count that divides by {n_group} (got {n}, scope {scope})")
    if bad := next((i for i, sc in scores.items() if not np.all(np.isfinite(sc))), None):
        raise UserError(f"scores of layer {bad} contain NaN/Inf: the weights are corrupt")
    return _plan(scores, _select(scores, n, scope, n_group), metric, scope, n, "exact")


def _select(scores: dict[int, np.ndarray], n: int, scope: str, n_group: int) -> dict[int, list[int]]:
    """Kept experts per layer: the N best (per router group when ``n_group > 1``), or by scope ``model``."""
    ids = sorted(scores)
    if scope == "model":
        return _model_scope(scores, ids, n)
    size = next(iter(scores.values())).size // n_group
    return {i: [g * size + e for g in range(n_group) for e in _top(scores[i][g * size:(g + 1) * size], n // n_group)]
            for i in ids}


def _plan(scores: dict[int, np.ndarray], kept: dict[int, list[int]], metric: str, scope: str, n: int,
          semantics: str) -> Plan:
    E = next(iter(scores.values())).size
    layers = {i: LayerPlan(tuple(sorted(kept[i])), tuple(sorted(set(range(E)) - set(kept[i]))),
                           tuple(float(x) for x in scores[i])) for i in sorted(scores)}
    return Plan(metric, scope, n, layers, semantics)


def _reference_kept(scores: dict[int, np.ndarray], ids: list[int], n: int, scope: str) -> dict[int, list[int]]:
    """The reference's selection, in float32 as it computes: keep ``score > t`` where ``t`` is the (N+1)-th
    largest score of the layer (scope ``layer``: fewer than N on ties) or the (N * layers + 1)-th largest of
    all layers (scope ``model``: one threshold, no minimum per layer)."""
    s32 = {i: scores[i].astype(np.float32) for i in ids}
    pools = {i: s32[i] for i in ids} if scope == "layer" else dict.fromkeys(ids, np.concatenate([s32[i] for i in ids]))
    count = n if scope == "layer" else n * len(ids)
    kept = {}
    for i in ids:
        ranked = np.sort(pools[i])[::-1]
        kept[i] = list(range(s32[i].size)) if count >= ranked.size else np.flatnonzero(s32[i] > ranked[count]).tolist()
        if not kept[i]:
            raise UserError(f"under reference semantics layer {i} keeps no expert (its scores all lie at or below "
                            "the threshold), which a MoNE checkpoint cannot hold: keep more experts or use semantics 'exact'")
    return kept


def _top(score: np.ndarray, n: int) -> list[int]:
    order = np.lexsort((np.arange(score.size), -score))  # score descending, lower index first
    return [int(e) for e in order[:n]]


def _model_scope(scores: dict[int, np.ndarray], ids: list[int], n: int) -> dict[int, list[int]]:
    total = int(round(n * len(ids)))
    flat = sorted((-float(scores[i][e]), i, e) for i in ids for e in range(scores[i].size))
    kept = {i: [_top(scores[i], 1)[0]] for i in ids}  # at least one expert per layer
    budget = total - len(ids)
    for _, i, e in flat:
        if budget <= 0:
            break
        if e not in kept[i]:
            kept[i].append(e)
            budget -= 1
    return kept


def plan_summary(plan: Plan, num_experts: int, requested_ratio: float | None = None) -> dict:
    """What a plan keeps: per MoE layer and overall, and the pruned fraction it achieves (next to the requested
    one, which whole expert counts can only approach)."""
    per_layer = {i: len(lp.kept) for i, lp in plan.layers.items()}
    total = num_experts * len(per_layer)
    out = {"kept_per_layer": {str(i): n for i, n in per_layer.items()}, "experts_kept": sum(per_layer.values()),
           "experts_total": total, "pruned_fraction": 1 - sum(per_layer.values()) / total}
    if requested_ratio is not None:
        out["requested_ratio"] = requested_ratio
    return out


def describe_summary(s: dict, num_experts: int) -> str:
    """One line for :func:`plan_summary`: kept per layer, overall, achieved vs requested pruned fraction."""
    counts = list(s["kept_per_layer"].values())
    if len(set(counts)) == 1:
        per = f"keep {counts[0]} of {num_experts} experts in each of {len(counts)} MoE layers"
    else:
        per = f"keep {'/'.join(map(str, counts))} of {num_experts} experts in MoE layers {'/'.join(s['kept_per_layer'])}"
    line = f"{per} ({s['experts_kept']} of {s['experts_total']} kept, {s['pruned_fraction']:.1%} pruned"
    req = s.get("requested_ratio")
    if req is not None and abs(req - s["pruned_fraction"]) > 1e-9:
        line += f"; {req:.1%} requested, rounded to whole experts"
    return line + ")"


def load_plan(path: str | Path) -> Plan:
    return Plan.load(path)


def save_plan(plan: Plan | dict, path: str | Path) -> None:
    Plan.from_dict(plan).save(path)

