"""``mone-jax inspect``: what a checkpoint holds, counted from its config and safetensors header."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mone_jax.convert.families import family, parse_config
from mone_jax.convert.reader import CheckpointReader, read_config


def summarize(folder: str | Path) -> dict:
    """Family, MoE layout and parameter counts (total, routed experts, active per token), bytes."""
    cfg = parse_config(read_config(folder))
    fam = family(cfg.model_type)
    total = routed = bytes_ = 0
    with CheckpointReader(folder) as r:
        for k in r.keys():
            n = int(np.prod(r.shape(k), dtype=np.int64))
            total += n
            bytes_ += n * r.dtype(k).itemsize
            if ".experts." in k and k.startswith("model.layers.") and f".{fam.moe_module}.experts." in k:
                routed += n
    n_moe = len(cfg.moe_layer_ids)
    active = total - routed + (routed * cfg.top_k // cfg.num_experts if cfg.num_experts else 0)
    return {
        "model_type": cfg.model_type,
        "layers": cfg.num_layers,
        "moe_layers": cfg.moe_layer_ids,
        "dense_layers": [i for i in range(cfg.num_layers) if not cfg.moe_layers[i]],
        "experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "hidden_size": cfg.hidden_size,
        "expert_intermediate_size": cfg.moe_intermediate_size,
        "shared_expert": bool(cfg.shared_expert_intermediate_size),
        "params_total": total,
        "params_routed_experts": routed,
        "params_active_per_token": active,
        "bytes": bytes_,
        "moe_layer_count": n_moe,
    }


def describe(folder: str | Path, as_json: bool = False) -> str:
    s = summarize(folder)
    if as_json:
        return json.dumps(s, indent=1)
    gb = s["bytes"] / 1e9
    return "\n".join([
        f"family           {s['model_type']}",
        f"layers           {s['layers']} ({s['moe_layer_count']} MoE: {_ranges(s['moe_layers'])};"
        f" dense: {_ranges(s['dense_layers']) or 'none'})",
        f"routed experts   {s['experts']} per MoE layer, top-{s['top_k']}, intermediate {s['expert_intermediate_size']}"
        + (", plus shared expert" if s["shared_expert"] else ""),
        f"parameters       {s['params_total']:,} total, {s['params_routed_experts']:,} in routed experts, "
        f"{s['params_active_per_token']:,} active per token",
        f"size             {s['bytes']:,} bytes ({gb:.3f} GB)",
    ])


def _ranges(ids: list[int]) -> str:
    out, start = [], None
    for j, i in enumerate(ids):
        if start is None:
            start = i
        if j + 1 == len(ids) or ids[j + 1] != i + 1:
            out.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ", ".join(out)
