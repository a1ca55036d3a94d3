"""config.json keys that transformers 4.x config classes read, added to a transformers 5 config.

transformers 5 writes RoPE as ``rope_parameters`` (theta, type, scaling and partial rotary factor in one
dict), the dtype as ``dtype`` and Qwen3-MoE's routed-expert count as ``num_local_experts``; a 4.x config
class (the MoNE reference code runs on transformers 4.53) reads ``rope_theta``, ``rope_scaling``,
``partial_rotary_factor``, ``torch_dtype`` and the family's own expert-count name, and silently falls back
to its defaults (128 experts, theta 10000) when they are missing. :func:`with_legacy_keys` writes both.
"""

from __future__ import annotations

from mone_jax.convert.families import Family, num_experts_key

_ROPE_TOP_LEVEL = ("rope_theta", "partial_rotary_factor")  # 4.x reads these beside rope_scaling


def with_legacy_keys(cfg: dict, fam: Family) -> dict:
    """``cfg`` plus the 4.x spelling of every key that transformers 5 renamed (the 5.x keys stay)."""
    out = dict(cfg)
    out[fam.num_experts_key] = cfg[num_experts_key(cfg, fam)]  # the family's legacy (hub) name
    if "dtype" in cfg and "torch_dtype" not in cfg:
        out["torch_dtype"] = cfg["dtype"]
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and not any(isinstance(v, dict) for v in params.values()):
        for key in _ROPE_TOP_LEVEL:
            if params.get(key) is not None:
                out[key] = params[key]
        rtype = params.get("rope_type", params.get("type", "default"))
        scaling = {k: v for k, v in params.items() if k not in _ROPE_TOP_LEVEL}
        out["rope_scaling"] = None if rtype == "default" else {**scaling, "type": rtype, "rope_type": rtype}
    return out
