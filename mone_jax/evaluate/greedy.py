"""``--scope greedy``: experts chosen on validation loss.

Start from the full model; at each step, among the candidates, replace by its novice the (layer, expert)
whose replacement raises the validation loss least, until the plan's budget of novices is spent. The
candidates of a layer are its ``candidates`` lowest-scored experts by the plan's metric that are not yet
novices (None: every one), in layers that keep more than ``top_k`` experts (a drop plan: in layers that have
not reached the same count as the others). Greedy selection on a held-out fitness follows EvoESAP / GRAPE
(choose what to prune by measured loss, not by a proxy score).

``lazy`` (the default of the command line) evaluates as CELF does (Leskovec et al., KDD 2007): a candidate's
rise in loss measured at an earlier step stands as a lower bound of its rise now (a replacement hurts no
less once others are replaced), so only the candidate with the least bound is measured again, and it is
chosen when its fresh rise is still the least. Each step then costs a few evaluations instead of one per
candidate; where the bound fails, the choice may differ from the exhaustive search's.

Every candidate is evaluated on the unpruned model made searchable (``MoEBlock.set_novice_mask``): the
masked experts act as their novice vectors while every array keeps its shape, so the whole search runs one
compiled loss program (:mod:`mone_jax.evaluate.perplexity`), like ``compare``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from mone_jax.base.errors import UserError
from mone_jax.base.phases import silenced
from mone_jax.base.stats import Stats
from mone_jax.evaluate.compare import WeightScores, evaluate, plan_of, pooled
from mone_jax.model.causal_lm import MoEForCausalLM
from mone_jax.model.sharding import spread
from mone_jax.pruning.planning import GREEDY, LayerPlan, Plan, resolve_keep


@contextmanager
def searchable(model: MoEForCausalLM, stats: Stats, semantics: str = "exact",
               fit: str | None = None) -> Iterator[dict[int, np.ndarray]]:
    """The unpruned ``model`` made searchable for the duration (its MoE blocks' novice tables from ``stats``):
    yields {MoE layer: bool mask [E]}; :func:`apply_masks` sends changed masks to the model."""
    blocks = model.moe_blocks()
    E = model.config.num_experts
    if any(b.num_kept != E for b in blocks.values()):
        raise UserError("the greedy search starts from the unpruned model: give the original model")
    dtype = next(iter(blocks.values())).gate_up[...].dtype
    masks = {i: np.zeros(E, bool) for i in blocks}
    try:
        for i, b in blocks.items():  # novices rounded through the model's dtype, as prune_params stores them
            table = stats.layers[i].novice_means(np.arange(E), semantics, fit).astype(np.dtype(dtype))
            b.set_novice_mask(jnp.asarray(table, jnp.float32), masks[i])
        yield masks
    finally:
        for b in blocks.values():
            b.clear_novice_mask()


def apply_masks(model: MoEForCausalLM, masks: dict[int, np.ndarray]) -> None:
    """Set the searchable model's novice masks (arrays only: the compiled program is reused)."""
    for i, b in model.moe_blocks().items():
        b.novice_mask[...] = jnp.asarray(masks[i])


def validation_nll(model: MoEForCausalLM, evals: dict[str, np.ndarray], batch_size: int,
                   mesh: Mesh | None = None) -> float:
    """Token-weighted mean NLL of ``model`` over every source of ``evals`` (rows split over ``mesh``)."""
    return pooled(evaluate(model, evals, batch_size, mesh))["nll"]


def parse_candidates(text: str | int | None) -> int | None:
    """``--candidates``: a positive count per layer, or ``all`` (None)."""
    if text is None or text == "all":
        return None
    try:
        n = int(text)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise UserError(f"--candidates takes a positive number of experts per layer or 'all', got '{text}'")
    return n


def greedy_plan(model: MoEForCausalLM, stats: Stats, evals: dict[str, np.ndarray], *, metric: str,
                keep: int | None = None, ratio: float | None = None, candidates: int | None = None,
                equal_counts: bool = False, lazy: bool = False, seed: int = 0, semantics: str = "exact",
                weight_scores: WeightScores | None = None, batch_size: int = 8, progress: bool = True,
                selection: dict | None = None, fit: str | None = None, mesh: Mesh | None = None) -> Plan:
    """The greedy plan (module docstring): ``(E - keep) x layers`` novices in all, each layer keeping at least
    ``top_k`` experts (``equal_counts``: exactly ``keep`` each, for drop). Candidates are ordered by the
    scores of ``metric``; ``lazy``: CELF evaluation (module docstring); ``fit``: the novices judged
    (:meth:`~mone_jax.base.stats.LayerStats.novice_means`). The plan's ``search`` records the
    evaluations spent, the seconds, the per-layer counts and each step's choice and validation loss. With a
    ``mesh`` the model is laid out on it (:func:`~mone_jax.model.sharding.spread`, in place) and every
    evaluation splits its rows over the devices."""
    cfg = model.config
    E, top_k = cfg.num_experts, cfg.top_k
    n = resolve_keep(E, keep, ratio)
    scored = plan_of(stats, metric, weight_scores, keep=E, scope="layer", seed=seed)
    scores = {i: np.asarray(lp.scores, np.float64) for i, lp in scored.layers.items()}
    floor = n if equal_counts else min(top_k, n)
    budget = (E - n) * len(scores)
    t0 = time.perf_counter()
    evaluations, steps = 0, []
    with searchable(model, stats, semantics, fit) as masks, silenced():
        apply_masks(model, masks)
        if mesh is not None:
            spread(model, mesh)
        nll = partial(validation_nll, model, evals, batch_size, mesh)
        start = current = nll()
        evaluations += 1
        rise: dict[tuple[int, int], tuple[float, int]] = {}  # candidate -> (rise in loss, step measured at)
        bar = tqdm(total=budget, desc="greedy search", unit="novice", disable=not progress)
        for step in range(budget):
            pool = [(i, e) for i in scores for e in _lowest(scores[i], masks[i], candidates)
                    if E - masks[i].sum() > floor]
            while True:
                stale = [c for c in pool if c not in rise or rise[c][1] < step and not lazy]
                if not stale and lazy:  # the least bound, measured again unless measured this step
                    least = min(pool, key=lambda c: (rise[c][0], c))
                    stale = [] if rise[least][1] == step else [least]
                if not stale:
                    break
                for i, e in stale:
                    masks[i][e] = True
                    apply_masks(model, masks)
                    rise[i, e] = (nll() - current, step)
                    masks[i][e] = False
                    evaluations += 1
            i, e = min(pool, key=lambda c: (rise[c][0], c))
            masks[i][e] = True
            current += rise.pop((i, e))[0]
            steps.append({"layer": i, "expert": e, "nll": current, "candidates": len(pool)})
            bar.set_postfix_str(f"layer {i} expert {e}: nll {current:.4f}", refresh=False)
            bar.update()
        bar.close()
        final = {i: m.copy() for i, m in masks.items()}
    layers = {i: LayerPlan(tuple(int(e) for e in np.flatnonzero(~final[i])), tuple(int(e) for e in np.flatnonzero(final[i])),
                           tuple(float(x) for x in scores[i])) for i in sorted(scores)}
    search = {"scope": GREEDY, "metric": metric, "candidates": "all" if candidates is None else candidates,
              "lazy": lazy, "equal_counts": equal_counts, "evaluations": evaluations, "seconds": time.perf_counter() - t0,
              "validation_nll_start": start, "validation_nll": steps[-1]["nll"] if steps else start,
              "kept_per_layer": {str(i): len(lp.kept) for i, lp in layers.items()}, "steps": steps,
              "validation": {k: {"blocks": int(v.shape[0]), "seq_len": int(v.shape[1])} for k, v in evals.items()}}
    return Plan(metric, GREEDY, n, layers, semantics, selection, scored.precision, search=search,
                fit=None if fit is None else {"method": fit})


def _lowest(score: np.ndarray, mask: np.ndarray, count: int | None) -> list[int]:
    """The ``count`` lowest-scored experts not yet masked (all of them for None), ties to the lower index."""
    order = [int(e) for e in np.lexsort((np.arange(score.size), score)) if not mask[e]]
    return order if count is None else order[:count]
