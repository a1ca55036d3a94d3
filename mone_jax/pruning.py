"""The pruning transform: parameters + statistics + plan -> parameters of the pruned model."""

from __future__ import annotations

import numpy as np
from flax import nnx

from mone_jax.errors import UserError
from mone_jax.model import MoEForCausalLM
from mone_jax.stats import Stats

MODES = ("substitute", "drop")


def check_plan(plan: dict, num_experts: int, moe_layers: list[int], *, mode: str = "substitute",
               top_k: int = 1, n_group: int = 1) -> None:
    """UserError unless ``plan`` partitions every MoE layer's experts into kept and novices."""
    layers = plan.get("layers") if isinstance(plan, dict) else None
    try:
        got = sorted(int(k) for k in layers)
        parts = {k: (list(e["kept"]), list(e["novices"])) for k, e in layers.items()}
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError):
        raise UserError("the plan is malformed: it needs 'layers' mapping layer ids to 'kept' and 'novices' "
                        "lists; recreate it with `mone-jax plan`") from None
    if got != sorted(moe_layers):
        raise UserError(f"the plan covers layers {got} but the model's MoE layers are {moe_layers}: "
                        "make the plan from this model's statistics")
    for key, (kept, nov) in parts.items():
        ids = kept + nov
        if not kept or not all(isinstance(e, (int, np.integer)) for e in ids) or sorted(ids) != list(range(num_experts)):
            raise UserError(f"plan layer {key}: kept and novices must partition experts 0..{num_experts - 1} "
                            "with at least one kept: the plan does not match this model")
    if mode == "drop":
        sizes = {len(e["kept"]) for e in layers.values()}
        if len(sizes) > 1:
            raise UserError(f"drop mode needs the same keep count in every layer, the plan has {sorted(sizes)}: "
                            "use --scope layer or --format substitution")
        k = sizes.pop()
        if k < top_k:
            raise UserError(f"drop mode must keep at least top-k = {top_k} experts per layer: raise --keep")
        if k % n_group:
            raise UserError(f"drop mode must keep a multiple of the router's n_group = {n_group} experts per layer "
                            f"(got {k}): change --keep or use --format substitution")


def prune_params(params: dict, stats: Stats, plan: dict, *, mode: str = "substitute") -> dict:
    """Pure function on the model's pure-dict state: [E, ...] expert stacks become [K, ...].

    ``substitute`` adds ``novice_values`` (the mean raw output of each pruned expert, zeros if it
    never ran) and the id maps; ``drop`` also removes the pruned experts' router columns.
    """
    if mode not in MODES:
        raise UserError(f"unknown prune mode '{mode}': use one of {', '.join(MODES)}")
    out = dict(params)
    out["layers"] = dict(params["layers"])
    for key, entry in plan["layers"].items():
        i = int(key)
        blk = params["layers"][i]["mlp"]
        kept = np.asarray(entry["kept"], np.int32)
        nov = np.asarray(entry["novices"], np.int32) if mode == "substitute" else np.zeros(0, np.int32)
        new = dict(blk)
        for name in ("gate_up", "down", "gate_up_bias", "down_bias"):  # per-expert arrays: K rows
            if name in blk:
                new[name] = blk[name][kept]
        new["kept_ids"] = kept
        new["novice_ids"] = nov
        dtype = blk["gate_up"].dtype
        new["novice_values"] = stats.layers[i].mean[nov].astype(np.float32).astype(dtype)
        if mode == "drop":
            new["router"] = blk["router"][:, kept]
            for name in ("router_bias", "score_bias"):  # per-expert router entries
                if name in blk:
                    new[name] = blk[name][kept]
        out["layers"][i] = {**params["layers"][i], "mlp": new}
    return out


def prune(model: MoEForCausalLM, stats: Stats, plan: dict, *, mode: str = "substitute") -> MoEForCausalLM:
    """A new pruned model (the router is unchanged in ``substitute`` mode)."""
    cfg = model.config
    for i, blk in model.moe_blocks().items():
        if blk.num_kept != cfg.num_experts:
            raise UserError(f"layer {i} is already pruned: prune the original model")
    check_plan(plan, cfg.num_experts, cfg.moe_layer_ids, mode=mode, top_k=cfg.top_k, n_group=cfg.n_group)
    stats.check_matches(cfg.model_type, cfg.num_experts, cfg.moe_layer_ids, cfg.hidden_size)
    params = prune_params(nnx.to_pure_dict(nnx.state(model)), stats, plan, mode=mode)
    kept = {int(k): len(v["kept"]) for k, v in plan["layers"].items()}
    if mode == "drop":
        new_cfg, kept = cfg.replace(num_experts=next(iter(kept.values()))), None
    else:
        new_cfg = cfg
    pruned = nnx.eval_shape(lambda: MoEForCausalLM(new_cfg, model.dtype, rngs=nnx.Rngs(0), kept=kept))
    state = nnx.state(pruned)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(pruned, state)
    pruned.impl, pruned.block = model.impl, model.block
    return pruned
