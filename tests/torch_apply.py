"""Independent PyTorch application of a pruning plan to a transformers model (test reference)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from reference import experts_modules


def substitute(hf_model, plan: dict, novices: dict[int, dict[int, np.ndarray]]):
    """Copy of ``hf_model`` whose novice experts return weight * vector (router untouched)."""
    model = copy.deepcopy(hf_model)
    for i, mod in experts_modules(model).items():
        entry = plan["layers"][str(i)]
        nov = torch.tensor(sorted(entry["novices"]), dtype=torch.long)
        table = torch.zeros(mod.gate_up_proj.shape[0], model.config.hidden_size, dtype=torch.float32)
        for e in entry["novices"]:
            table[e] = torch.as_tensor(novices[i][e], dtype=torch.float32)
        orig = mod.forward

        def forward(hidden, *args, orig=orig, nov=nov, table=table, **kwargs):
            # every family passes (ids, weights) [T, k] positionally; GPT-OSS as router_indices / routing_weights
            names = [n for n in ("top_k_index", "top_k_weights", "router_indices", "routing_weights") if n in kwargs]
            top_k_index, top_k_weights = (list(args) + [kwargs.pop(n) for n in names])[:2]
            is_nov = torch.isin(top_k_index, nov)
            kept_w = torch.where(is_nov, torch.zeros_like(top_k_weights), top_k_weights)
            out = orig(hidden, top_k_index, kept_w, **kwargs)
            nov_w = torch.where(is_nov, top_k_weights, torch.zeros_like(top_k_weights))
            return out + (nov_w[..., None].float() * table[top_k_index]).sum(1).to(out.dtype)

        mod.forward = forward
    return model


def per_expert(t: torch.Tensor, kept, num_experts: int) -> torch.Tensor | None:
    """The kept experts' entries of a per-expert tensor (experts on the first axis, or the last of ERNIE-4.5's
    [1, E] score-correction bias); None for a tensor that is not per expert."""
    if t.shape[:1] == (num_experts,):
        return t[kept].clone()
    if t.dim() == 2 and t.shape == (1, num_experts):
        return t[:, kept].clone()
    return None


def drop(hf_model, plan: dict):
    """Copy of ``hf_model`` with pruned experts and every per-expert router entry (weight rows, bias,
    e_score_correction_bias) removed; grouped routers then form groups from the kept ids in order."""
    model = copy.deepcopy(hf_model)
    for i, layer in enumerate(model.model.layers):
        mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        if not hasattr(mlp, "experts"):
            continue
        router = getattr(mlp, "router", None) or mlp.gate
        kept = torch.tensor(plan["layers"][str(i)]["kept"], dtype=torch.long)
        E = mlp.experts.num_experts
        with torch.no_grad():
            # HunYuan's router weight is in a submodule (gate.wg); MiniMax-M2's score bias is on the MoE block
            for mod in (*router.modules(), mlp.experts, mlp):
                for name, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
                    new = per_expert(t, kept, E)
                    assert mod is mlp or new is not None, name  # every router / experts tensor is per expert
                    if new is not None:
                        setattr(mod, name, torch.nn.Parameter(new) if isinstance(t, torch.nn.Parameter) else new)
            router.num_experts = mlp.experts.num_experts = len(kept)
    return model
