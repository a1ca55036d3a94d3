"""Generic parsing of Hugging Face ``config.json`` dicts: lookups, RoPE, the fields every family shares.

Per-family rules (defaults, MoE layout, routing) are hooks in :mod:`mone_jax.convert.families`.
"""

from __future__ import annotations

from mone_jax.base.config import RopeConfig
from mone_jax.base.errors import UserError

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def get(cfg: dict, *names, default=None):
    """The first of ``names`` set (not None) in ``cfg``, else ``default``."""
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def need(cfg: dict, *names):
    """Like :func:`get`, but a missing key is a UserError naming it."""
    v = get(cfg, *names)
    if v is None:
        raise UserError(f"config.json lacks '{names[0]}' (model_type {cfg.get('model_type')}): the config is incomplete")
    return v


def parse_rope(cfg: dict, head_dim: int, max_pos: int, interleave: bool = False) -> RopeConfig:
    """Merge ``rope_theta`` / ``rope_scaling`` (legacy) and ``rope_parameters`` (transformers 5).

    ``head_dim``: the per-head width RoPE applies to (before ``partial_rotary_factor``);
    ``interleave``: rotate adjacent pairs (DeepSeek) instead of halves.
    """
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    rtype = params.get("rope_type", params.get("type", "default"))
    if rtype not in ROPE_TYPES:
        raise UserError(
            f"rope type '{rtype}' is not supported (supported: {', '.join(ROPE_TYPES)}): "
            "a wrong RoPE would give silently wrong logits"
        )
    theta = get(params, "rope_theta", default=get(cfg, "rope_theta", default=10000.0))
    partial = get(params, "partial_rotary_factor", default=get(cfg, "partial_rotary_factor", default=1.0))
    orig = get(params, "original_max_position_embeddings", default=get(cfg, "original_max_position_embeddings"))
    factor = params.get("factor")
    if rtype in ("yarn", "longrope") and factor is None:
        factor = max_pos / (orig or max_pos)
    rotary_dim = int(head_dim * float(partial))
    short, long = (tuple(float(x) for x in params.get(k) or ()) for k in ("short_factor", "long_factor"))
    if rtype == "longrope" and (not orig or len(short) != rotary_dim // 2 or len(long) != rotary_dim // 2):
        raise UserError(f"longrope needs original_max_position_embeddings and {rotary_dim // 2} short_factor and "
                        f"long_factor values (got {len(short)} and {len(long)}): the config is incomplete")
    return RopeConfig(
        theta=float(theta),
        type=rtype,
        factor=float(factor if factor is not None else 1.0),
        rotary_dim=rotary_dim,
        original_max_position_embeddings=int(orig or max_pos),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        interleave=interleave,
        short_factor=short,
        long_factor=long,
    )


def _token_id(cfg: dict, key: str) -> int | None:
    tok = cfg.get(key)
    if isinstance(tok, list):
        tok = tok[0] if tok else None
    return tok if isinstance(tok, int) else None


def common_fields(cfg: dict, num_experts_key: str) -> dict:
    """ModelConfig keyword arguments every family reads the same way."""
    d = int(need(cfg, "hidden_size"))
    n_heads = int(need(cfg, "num_attention_heads"))
    head_dim = int(get(cfg, "head_dim", default=d // n_heads))
    max_pos = int(get(cfg, "max_position_embeddings", default=4096))
    out = dict(
        model_type=cfg["model_type"],
        vocab_size=int(need(cfg, "vocab_size")),
        hidden_size=d,
        num_layers=int(need(cfg, "num_hidden_layers")),
        num_heads=n_heads,
        num_kv_heads=int(get(cfg, "num_key_value_heads", default=n_heads)),
        head_dim=head_dim,
        intermediate_size=int(get(cfg, "intermediate_size", default=0)),
        rms_norm_eps=float(get(cfg, "rms_norm_eps", default=1e-6)),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope=parse_rope(cfg, head_dim, max_pos),
        hidden_act=str(cfg.get("hidden_act", "silu")),
        num_experts=int(need(cfg, num_experts_key, "num_experts", "num_local_experts", "n_routed_experts")),
        top_k=int(need(cfg, "num_experts_per_tok")),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        bos_token_id=_token_id(cfg, "bos_token_id"),
        eos_token_id=_token_id(cfg, "eos_token_id"),
    )
    if out["hidden_act"] not in ("silu", "swish"):
        raise UserError(f"hidden_act '{out['hidden_act']}' is not supported (only silu): the config is unusual")
    return out


def sliding_windows(cfg: dict, n_layers: int, default_types=None) -> tuple[int | None, ...]:
    """Per-layer sliding window from ``sliding_window`` and ``layer_types`` (``default_types(n)`` when a
    family alternates layer types without writing them); every layer when there are no types."""
    window = cfg.get("sliding_window")
    if not window:
        return (None,) * n_layers
    types = cfg.get("layer_types") or (default_types(n_layers) if default_types else None)
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (int(window),) * n_layers
