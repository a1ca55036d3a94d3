"""``mone-jax inspect``: what a checkpoint holds, counted from its config and safetensors header."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mone_jax.convert.families import family, parse_config
from mone_jax.convert.formats import read_novices
from mone_jax.convert.reader import CheckpointReader, read_config
from mone_jax.pruning.card import PLAN_FILE
from mone_jax.pruning.planning import Plan


def summarize(folder: str | Path) -> dict:
    """Family, MoE layout and parameter counts (total, routed experts, active per token), bytes."""
    raw = read_config(folder)
    cfg = parse_config(raw)
    fam = family(cfg.model_type)
    total = routed = bytes_ = 0
    with CheckpointReader(folder) as r:
        for k in r.stored.keys():  # as stored: a quantized tensor's parts (its scales count as parameters)
            n = int(np.prod(r.stored.shape(k), dtype=np.int64))
            total += n
            bytes_ += n * r.stored.dtype(k).itemsize
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
        **_pruning(Path(folder), raw, fam, cfg.num_experts),
    }


def _pruning(folder: Path, raw: dict, fam, num_experts: int) -> dict:
    """An export's format and, per MoE layer, its kept experts and novices (original ids); ``{}`` for a model
    that was not pruned. A drop export is a stock checkpoint: its plan file (written by ``prune``) tells."""
    found = read_novices(raw, fam)
    plan_file = folder / PLAN_FILE
    if found is not None:
        fmt, novices = found
        layers = {str(i): {"kept": [e for e in range(num_experts) if e not in nov], "novices": sorted(nov)}
                  for i, nov in sorted(novices.items())}
        return {"format": fmt.name, "pruned_layers": layers}
    if plan_file.is_file():
        plan = Plan.load(plan_file)
        return {"format": "drop", "pruned_layers": {str(i): {"kept": list(lp.kept), "dropped": list(lp.novices)}
                                                    for i, lp in plan.layers.items()}}
    return {}


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
        *_pruned_lines(s),
    ])


def _pruned_lines(s: dict) -> list[str]:
    if "format" not in s:
        return []
    out = [f"pruned           format {s['format']}"]
    for i, lp in s["pruned_layers"].items():
        gone = "novices" if "novices" in lp else "dropped"
        out.append(f"  layer {i:<9} kept {len(lp['kept'])}: {_ranges(lp['kept'])}; {gone} {len(lp[gone])}: "
                   f"{_ranges(lp[gone]) or 'none'}")
    return out


def _ranges(ids: list[int]) -> str:
    out, start = [], None
    for j, i in enumerate(ids):
        if start is None:
            start = i
        if j + 1 == len(ids) or ids[j + 1] != i + 1:
            out.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ", ".join(out)
