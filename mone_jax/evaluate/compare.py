"""Plans judged side by side from one calibration (``mone-jax compare``) and chosen by validation loss
(``--metric auto``).

Every candidate (metric x ratio x mode, and where asked x scope x fit; ``random`` over several seeds) is a plan
made from the same statistics, applied to the loaded model and evaluated on validation token blocks, per
source. A greedy scope searches its plan on those blocks (:mod:`mone_jax.evaluate.greedy`, once per metric,
ratio and seed, shared by its fits); ``kd`` distils the pruned model on the calibration blocks. Plans of
one (mode, keep) give pruned models of identical array shapes and one graphdef, so the jitted loss of
:mod:`mone_jax.evaluate.perplexity` compiles once per shape: the kept ids, the novice ids and values and the
gathered expert rows of a plan are array inputs of it (its pruned parameter state).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mone_jax.base.compile_cache import CompileClock
from mone_jax.base.errors import UserError
from mone_jax.base.phases import Steps, phase
from mone_jax.base.stats import Stats
from mone_jax.evaluate.perplexity import _nll_sum, perplexity
from mone_jax.model.causal_lm import MoEForCausalLM
from mone_jax.pruning.planning import (
    DISTILLED,
    FITS,
    GREEDY,
    NO_FIT,
    SCOPES,
    Plan,
    make_plan,
    plan_from_scores,
    prune_mode,
    resolve_keep,
)
from mone_jax.pruning.scoring import METRICS, metric
from mone_jax.pruning.transform import prune

AUTO = "auto"
SEEDED = ("random",)  # metrics evaluated over several seeds


@dataclass(frozen=True)
class Candidate:
    """One plan to judge: ``ratio`` of the experts pruned by ``metric`` (``seed`` for random), output ``mode``;
    ``scope`` (None: the run's) and ``fit`` (None: not named, ``none``: plain means) where the run names them."""

    metric: str
    ratio: float
    mode: str
    seed: int = 0
    scope: str | None = None
    fit: str | None = None

    @property
    def column(self) -> str:
        return f"{self.mode}@{self.ratio:g}"


def candidates(metrics: Sequence[str] | None, ratios: Sequence[float], modes: Sequence[str],
               seeds: Sequence[int], scopes: Sequence[str] | None = None,
               fits: Sequence[str] | None = None) -> list[Candidate]:
    """Every metric (default: the whole registry) x ratio x mode (x scope x fit where given: ``none`` is no fit);
    seeded metrics once per seed."""
    metrics = list(METRICS if metrics is None else metrics)
    for m in metrics:
        metric(m)  # known
    modes = [prune_mode(m) for m in modes]
    if not metrics or not ratios or not modes or not seeds or scopes == [] or fits == []:
        raise UserError("give at least one metric, ratio, mode, seed, scope and fit to compare")
    for s in scopes or ():
        if s not in (*SCOPES, GREEDY):
            raise UserError(f"unknown scope '{s}': use one of {', '.join((*SCOPES, GREEDY))}")
    for f in fits or ():
        if f not in (NO_FIT, *FITS):
            raise UserError(f"unknown fit '{f}': use one of {', '.join((NO_FIT, *FITS))}")
    if "drop" in modes and (GREEDY in (scopes or ()) or set(fits or ()) - {NO_FIT}):
        raise UserError("--scopes greedy and --fits judge experts replaced by their novices, which drop removes: "
                        "use --modes substitution")
    return [Candidate(m, r, mode, s, scope, fit) for mode in modes for r in ratios
            for m in metrics for s in (seeds if m in SEEDED else seeds[:1]) for scope in (scopes or [None])
            for fit in (fits or [None])]


def label(row: dict) -> str:
    """A compared plan's name: its metric, then its scope and fit where the run named them."""
    fit = row.get("fit")
    return row["metric"] + (f" {row['scope']}" if "scope" in row else "") + (f" + {fit}" if fit not in (None, NO_FIT)
                                                                            else "")


def pooled(results: dict[str, dict]) -> dict:
    """Token-weighted mean NLL (and its perplexity) over several sources' results."""
    tokens = sum(r["tokens"] for r in results.values())
    nll = sum(r["nll"] * r["tokens"] for r in results.values()) / tokens
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": tokens}


def evaluate(model: MoEForCausalLM, evals: dict[str, np.ndarray], batch_size: int = 8, mesh=None) -> dict[str, dict]:
    """``{source: {"nll", "perplexity", "tokens"}}`` of ``model`` on each source's token blocks, rows split over
    ``mesh`` if given (no phase line but ``compile``: the caller reports progress per model)."""
    return {name: perplexity(model, ids, batch_size=batch_size, lines=False, mesh=mesh) for name, ids in evals.items()}


WeightScores = dict[str, dict[int, np.ndarray]]  # weights-only metric -> {MoE layer: scores [E]}


def _nll_of(results: dict[str, dict]) -> float:
    """The NLL over every source of one model's results (the pooled one where there are several)."""
    return results["all"]["nll"] if "all" in results else next(iter(results.values()))["nll"]


def plan_of(stats: Stats, name: str, weight_scores: WeightScores | None = None, **kw) -> Plan:
    """The plan of metric ``name``: from the statistics, or from ``weight_scores[name]`` for a weights-only one."""
    if metric(name).needs_weights:
        if not weight_scores or name not in weight_scores:
            raise UserError(f"metric '{name}' scores the weights: its scores must be computed from the model folder")
        kw.pop("seed", None)
        return plan_from_scores(weight_scores[name], metric=name, **kw)
    return make_plan(stats, metric=name, **kw)


def plan_for(model: MoEForCausalLM, stats: Stats, c: Candidate, scope: str = "layer",
             weight_scores: WeightScores | None = None) -> Plan:
    """The plan of candidate ``c`` (a drop plan keeps the same number in each router group)."""
    n_group = model.config.n_group if c.mode == "drop" else 1
    return plan_of(stats, c.metric, weight_scores, ratio=c.ratio, scope=scope, seed=c.seed, n_group=n_group)


def pruned_model(model: MoEForCausalLM, stats: Stats, evals: dict[str, np.ndarray], c: Candidate, *,
                 scope: str = "layer", weight_scores: WeightScores | None = None, batch_size: int = 8,
                 train: np.ndarray | None = None, searched: dict | None = None, greedy_candidates: int | None = 4,
                 lazy: bool = True, progress: bool = True) -> tuple[MoEForCausalLM, Plan, dict]:
    """(pruned model, plan, record) of candidate ``c``: its plan (a greedy one searched on ``evals``, kept in
    ``searched`` for the candidate's other fits), its fit (``kd``: distilled on the blocks ``train``, stopped on
    ``evals``); the record holds the search (``search``) and the fit (``fitted``)."""
    from dataclasses import replace

    record: dict = {}
    if (c.scope or scope) == GREEDY:
        from mone_jax.evaluate.greedy import greedy_plan

        key = (c.metric, c.ratio, c.seed)
        if searched is None or key not in searched:
            plan = greedy_plan(model, stats, evals, metric=c.metric, ratio=c.ratio, candidates=greedy_candidates,
                               lazy=lazy, seed=c.seed, weight_scores=weight_scores, batch_size=batch_size,
                               progress=progress)
            if searched is not None:
                searched[key] = plan
        plan = searched[key] if searched is not None else plan
        record["search"] = {k: plan.search[k] for k in ("evaluations", "seconds", "kept_per_layer", "candidates",
                                                         "lazy")}
    else:
        plan = plan_for(model, stats, c, c.scope or scope, weight_scores)
    if c.fit in DISTILLED:
        from mone_jax.evaluate.distill import distill

        if train is None:
            raise UserError(f"--fits {c.fit} trains on the calibration blocks: none were given")
        student = prune(model, stats, plan, mode=c.mode)
        record["fitted"] = distill(model, student, train, np.concatenate(list(evals.values())), batch_size=batch_size,
                                seed=c.seed, progress=progress, method=c.fit)
        return student, replace(plan, fit=record["fitted"]), record
    if c.fit not in (None, NO_FIT):
        plan = replace(plan, fit={"method": c.fit})
        record["fitted"] = plan.fit
    return prune(model, stats, plan, mode=c.mode), plan, record


def compare(model: MoEForCausalLM, stats: Stats, evals: dict[str, np.ndarray], cands: Sequence[Candidate], *,
            scope: str = "layer", batch_size: int = 8, weight_scores: WeightScores | None = None,
            progress: bool = True, train: np.ndarray | None = None, greedy_candidates: int | None = 4,
            lazy: bool = True) -> dict:
    """Evaluate every candidate's pruned model (and the original) on every source of ``evals``; weights-only
    metrics plan from ``weight_scores``; ``train``: the calibration blocks ``kd`` fits on; ``greedy_candidates``
    and ``lazy``: the greedy search's (:func:`~mone_jax.evaluate.greedy.greedy_plan`).

    Returns a JSON-able dict: ``original`` ({source: result}), ``plans`` (one entry per candidate:
    metric, ratio, mode, seed (scope and fit where the candidate names them), keep, kept ids per layer,
    per-source ``nll`` / ``perplexity``, its ``seconds`` (search and fit included) and compile seconds, the
    records ``search`` and ``fitted``), ``sources`` (tokens per source).
    """
    E = model.config.num_experts
    for r in sorted({c.ratio for c in cands}):
        resolve_keep(E, None, r)  # in range
    rows, compiled, searched = [], _nll_sum._cache_size(), {}
    costly = [c for c in cands if (c.scope or scope) == GREEDY or c.fit in DISTILLED]
    if costly:
        searches = len({(c.metric, c.ratio, c.seed) for c in costly if (c.scope or scope) == GREEDY})
        phase("compare", f"{len(cands)} candidates, {searches} greedy search{'es' * (searches != 1)} and "
                         f"{sum(c.fit in DISTILLED for c in cands)} distillation(s) among them")
    steps = Steps("compare", len(cands) + 1, "plans", bar=progress)
    with CompileClock() as clock:
        t0 = time.perf_counter()
        original = evaluate(model, evals, batch_size)
        if len(evals) > 1:
            original = {"all": pooled(original), **original}
        original_s, original_c = time.perf_counter() - t0, clock.seconds
        steps.step(f"the original model, NLL {_nll_of(original):.4f}")
        for c in cands:
            t0, c0 = time.perf_counter(), clock.seconds
            pruned, plan, record = pruned_model(
                model, stats, evals, c, scope=scope, weight_scores=weight_scores, batch_size=batch_size, train=train,
                searched=searched, greedy_candidates=greedy_candidates, lazy=lazy, progress=progress)
            res = evaluate(pruned, evals, batch_size)
            if len(evals) > 1:
                res["all"] = pooled(res)
            named = {**({} if c.scope is None else {"scope": c.scope}), **({} if c.fit is None else {"fit": c.fit})}
            rows.append({"metric": c.metric, "ratio": c.ratio, "mode": c.mode, "seed": c.seed, **named,
                         "keep": plan.keep, "nll": {k: v["nll"] for k, v in res.items()},
                         "perplexity": {k: v["perplexity"] for k, v in res.items()},
                         "kept": {str(i): list(lp.kept) for i, lp in plan.layers.items()},
                         "seconds": time.perf_counter() - t0, "compile_seconds": clock.seconds - c0, **record})
            name = label({"metric": c.metric, **named})
            steps.step(f"{c.mode} {c.ratio:g} {name}{f' seed {c.seed}' if c.metric in SEEDED else ''}, "
                       f"NLL {_nll_of(res):.4f}")
    steps.close()
    return {"compiles": _nll_sum._cache_size() - compiled, "original": {k: {"nll": v["nll"], "perplexity": v["perplexity"]} for k, v in original.items()},
            "original_seconds": original_s, "original_compile_seconds": original_c,
            "sources": {k: {"tokens": v["tokens"], "blocks": sum(int(evals[s].shape[0]) for s in evals if k in (s, "all")),
                            "seq_len": int(next(iter(evals.values())).shape[1])} for k, v in original.items()},
            "num_experts": E, "top_k": model.config.top_k, "scope": scope, "plans": rows}


def select(model: MoEForCausalLM, stats: Stats, evals: dict[str, np.ndarray], *, keep: int, mode: str = "substitute",
           scope: str = "layer", seed: int = 0, n_group: int = 1, metrics: Sequence[str] | None = None,
           weight_scores: WeightScores | None = None, batch_size: int = 8, progress: bool = True) -> Plan:
    """``--metric auto``: the plan of the candidate metric (default: every registered one) whose pruned model has
    the lowest validation loss (token-weighted mean NLL over ``evals``, which must be disjoint from the
    calibration tokens); ties go to the earlier metric. The plan records every candidate's loss."""
    losses, plans = {}, {}
    names = list(METRICS if metrics is None else metrics)
    steps = Steps("auto", len(names), "candidate metrics", bar=progress)
    for m in names:
        t0 = time.perf_counter()
        plans[m] = plan_of(stats, m, weight_scores, keep=keep, scope=scope, seed=seed, n_group=n_group)
        losses[m] = {**pooled(evaluate(prune(model, stats, plans[m], mode=mode), evals, batch_size)),
                     "seconds": time.perf_counter() - t0}
        steps.step(f"{m}, NLL {losses[m]['nll']:.4f}")
    steps.close()
    best = min(losses, key=lambda m: losses[m]["nll"])
    record = {"chosen": best, "mode": mode, "seed": seed, "criterion": "validation mean token NLL",
              "validation": {k: {"blocks": int(v.shape[0]), "seq_len": int(v.shape[1])} for k, v in evals.items()},
              "candidates": {m: {"nll": r["nll"], "perplexity": r["perplexity"], "tokens": r["tokens"],
                                 "seconds": r["seconds"]} for m, r in losses.items()}}
    p = plans[best]
    return Plan(best, p.scope, p.keep, p.layers, selection=record)
