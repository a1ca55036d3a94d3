"""The pruning transform: parameters + statistics + plan -> parameters of the pruned model."""

from __future__ import annotations

import numpy as np
from flax import nnx

from mone_jax.base.errors import UserError
from mone_jax.base.stats import Stats
from mone_jax.model.causal_lm import MoEForCausalLM
from mone_jax.pruning.planning import Plan, prune_mode


def prune_params(params: dict, stats: Stats, plan: Plan, *, mode: str = "substitution") -> dict:
    """Pure function on the model's pure-dict state: [E, ...] expert stacks become [K, ...].

    ``substitution`` adds ``novice_values`` (the mean raw output of each pruned expert, zeros if it
    never ran; bfloat16-rounded under the plan's reference semantics) and the id maps; ``drop`` also removes
    the pruned experts' router columns.
    """
    mode = prune_mode(mode)
    out = dict(params)
    out["layers"] = dict(params["layers"])
    for i, lp in plan.layers.items():
        blk = params["layers"][i]["mlp"]
        kept = np.asarray(lp.kept, np.int32)
        nov = np.asarray(lp.novices, np.int32) if mode == "substitute" else np.zeros(0, np.int32)
        new = dict(blk)
        for name in ("gate_up", "down", "gate_up_bias", "down_bias"):  # per-expert arrays: K rows
            if name in blk:
                new[name] = blk[name][kept]
        new["kept_ids"] = kept
        new["novice_ids"] = nov
        dtype = blk["gate_up"].dtype
        new["novice_values"] = stats.layers[i].novice_means(nov, plan.semantics, plan.fit_method).astype(dtype)
        if mode == "drop":
            new["router"] = blk["router"][:, kept]
            for name in ("router_bias", "score_bias"):  # per-expert router entries
                if name in blk:
                    new[name] = blk[name][kept]
        out["layers"][i] = {**params["layers"][i], "mlp": new}
    return out


def prune(model: MoEForCausalLM, stats: Stats, plan: Plan | dict, *, mode: str = "substitution") -> MoEForCausalLM:
    """A new pruned model: ``substitution`` turns the plan's novices into constant vectors (router unchanged),
    ``drop`` removes them; ``plan`` may be its JSON dict."""
    mode = prune_mode(mode)
    cfg = model.config
    for i, blk in model.moe_blocks().items():
        if blk.num_kept != cfg.num_experts:
            raise UserError(f"layer {i} is already pruned: prune the original model")
    plan = Plan.from_dict(plan).validate(cfg, mode)
    stats.check_matches(cfg.model_type, cfg.num_experts, cfg.moe_layer_ids, cfg.hidden_size)
    params = prune_params(nnx.to_pure_dict(nnx.state(model)), stats, plan, mode=mode)
    kept = {i: len(lp.kept) for i, lp in plan.layers.items()}
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
