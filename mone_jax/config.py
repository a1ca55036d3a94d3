"""Family-neutral model configuration parsed from a Hugging Face ``config.json`` (as plain data)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mone_jax.convert.families import COMPRESSED_SUFFIX, family
from mone_jax.errors import UserError

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (transformers' ``rope_parameters`` / legacy ``rope_scaling``)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    rotary_dim: int = 0  # dims rotated per head (partial rotary when < head_dim)
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    interleave: bool = False  # DeepSeek-V3 style interleaved pairs


@dataclass(frozen=True)
class ModelConfig:
    """Everything the Flax model needs; hashable so it can be a static jit argument."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig
    hidden_act: str = "silu"
    # attention
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # "none" | "proj" (OLMoE: over the whole projection) | "head" (Qwen3)
    clip_qkv: float | None = None
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full attention
    attention_sinks: bool = False  # GPT-OSS: a learned per-head logit joins each softmax
    # multi-head latent attention (DeepSeek-V2/V3), used when kv_lora_rank > 0
    q_lora_rank: int = 0  # 0: a plain q_proj
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # MoE
    moe_layers: tuple[bool, ...] = ()
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    group_score: str = "max"  # group-limited routing: "max" (DeepSeek-V2) | "top2" (sum of top 2: V3/GLM)
    n_group: int = 1
    topk_group: int = 1  # groups kept per token (selection is group-limited when < n_group)
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    router_bias: bool = False  # GPT-OSS: logits = x @ W + b
    score_bias: bool = False  # DeepSeek-V3/GLM e_score_correction_bias: added to scores to choose experts only
    router_fp32: bool = False  # router weight kept and applied in float32 (transformers' keep-in-fp32 gates)
    expert_bias: bool = False  # GPT-OSS: biases on the experts' gate_up and down projections
    glu: str = "swiglu"  # "swiglu" | "gpt_oss" (clamped, alpha-scaled sigmoid, up + 1)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    raw: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, m in enumerate(self.moe_layers) if m]

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def _get(cfg: dict, *names, default=None):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def _need(cfg: dict, *names):
    v = _get(cfg, *names)
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
    theta = _get(params, "rope_theta", default=_get(cfg, "rope_theta", default=10000.0))
    partial = _get(params, "partial_rotary_factor", default=_get(cfg, "partial_rotary_factor", default=1.0))
    orig = _get(params, "original_max_position_embeddings", default=_get(cfg, "original_max_position_embeddings"))
    factor = params.get("factor")
    if rtype == "yarn" and factor is None:
        factor = max_pos / (orig or max_pos)
    return RopeConfig(
        theta=float(theta),
        type=rtype,
        factor=float(factor if factor is not None else 1.0),
        rotary_dim=int(head_dim * float(partial)),
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
    )


def _qwen_moe_layers(cfg: dict, n_layers: int, n_experts: int) -> tuple[bool, ...]:
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    only = set(cfg.get("mlp_only_layers") or [])
    return tuple(i not in only and n_experts > 0 and (i + 1) % step == 0 for i in range(n_layers))


def _sliding(cfg: dict, n_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding window, following each family's config rules."""
    window = cfg.get("sliding_window")
    mt = cfg["model_type"]
    if mt in ("qwen2_moe", "qwen3_moe") and not cfg.get("use_sliding_window", False):
        window = None
    if not window or mt in ("deepseek_v2", "deepseek_v3", "glm4_moe"):  # full attention only
        return (None,) * n_layers
    types = cfg.get("layer_types")
    if mt == "gpt_oss" and not types:  # GPT-OSS alternates sliding and full layers
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    if mt == "qwen2_moe":
        max_window = int(cfg.get("max_window_layers", n_layers))
        return tuple(window if (i + 1) % 2 and i < max_window else None for i in range(n_layers))
    return (int(window),) * n_layers


# transformers' config-class defaults for keys a config.json may omit (explicit nulls are kept).
_DEFAULTS: dict[str, dict] = {
    "deepseek_v2": {"first_k_dense_replace": 0, "n_shared_experts": 2, "routed_scaling_factor": 1.0,
                    "topk_method": "greedy", "q_lora_rank": 1536},
    "deepseek_v3": {"first_k_dense_replace": 3, "n_shared_experts": 1, "routed_scaling_factor": 2.5, "n_group": 8,
                    "topk_group": 4, "norm_topk_prob": True, "rope_interleave": True, "q_lora_rank": 1536},
    "glm4_moe": {"first_k_dense_replace": 1, "n_shared_experts": 1, "routed_scaling_factor": 1.0, "n_group": 1,
                 "topk_group": 1, "norm_topk_prob": True, "partial_rotary_factor": 0.5},
    "gpt_oss": {"attention_bias": True, "sliding_window": 128, "swiglu_alpha": 1.702, "swiglu_limit": 7.0, "rope_theta": 150000.0},
}
_GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}


def parse_config(cfg: dict) -> ModelConfig:
    """Parse a config.json dict into a :class:`ModelConfig` (UserError on anything unsupported)."""
    mt = cfg.get("model_type")
    if not mt:
        raise UserError("config.json has no 'model_type': pass a Hugging Face model folder")
    try:
        fam = family(mt)
    except ValueError as e:
        raise UserError(str(e)) from None
    mt = mt.removesuffix(COMPRESSED_SUFFIX)
    cfg = {**_DEFAULTS.get(mt, {}), **cfg, "model_type": mt}
    if mt == "gpt_oss" and not cfg.get("rope_parameters") and not cfg.get("rope_scaling"):
        cfg["rope_scaling"] = _GPT_OSS_ROPE
    d = int(_need(cfg, "hidden_size"))
    n_layers = int(_need(cfg, "num_hidden_layers"))
    n_heads = int(_need(cfg, "num_attention_heads"))
    n_kv = int(_get(cfg, "num_key_value_heads", default=n_heads))
    head_dim = int(_get(cfg, "head_dim", default=d // n_heads))
    max_pos = int(_get(cfg, "max_position_embeddings", default=4096))
    n_experts = int(_need(cfg, fam.num_experts_key, "num_experts", "num_local_experts", "n_routed_experts"))
    common = dict(
        model_type=mt,
        vocab_size=int(_need(cfg, "vocab_size")),
        hidden_size=d,
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=int(_get(cfg, "intermediate_size", default=0)),
        rms_norm_eps=float(_get(cfg, "rms_norm_eps", default=1e-6)),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope=parse_rope(cfg, head_dim, max_pos),
        hidden_act=str(cfg.get("hidden_act", "silu")),
        sliding_windows=_sliding(cfg, n_layers),
        num_experts=n_experts,
        top_k=int(_need(cfg, "num_experts_per_tok")),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        raw=cfg,
    )
    if common["hidden_act"] not in ("silu", "swish"):
        raise UserError(f"hidden_act '{common['hidden_act']}' is not supported (only silu): the config is unusual")
    if mt == "olmoe":
        return ModelConfig(
            **common, qkv_bias=bool(cfg.get("attention_bias", False)), o_bias=bool(cfg.get("attention_bias", False)),
            qk_norm="proj", clip_qkv=cfg.get("clip_qkv"), moe_layers=(True,) * n_layers,
            moe_intermediate_size=int(_need(cfg, "intermediate_size")),
        )
    if mt in ("qwen2_moe", "qwen3_moe"):
        is_q2 = mt == "qwen2_moe"
        return ModelConfig(
            **common,
            qkv_bias=bool(cfg.get("qkv_bias", True)) if is_q2 else bool(cfg.get("attention_bias", False)),
            o_bias=False if is_q2 else bool(cfg.get("attention_bias", False)),
            qk_norm="none" if is_q2 else "head",
            moe_layers=_qwen_moe_layers(cfg, n_layers, n_experts),
            moe_intermediate_size=int(_need(cfg, "moe_intermediate_size")),
            shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size", 0) or 0) if is_q2 else 0,
            shared_expert_gate=is_q2 and bool(cfg.get("shared_expert_intermediate_size")),
        )
    if mt == "mixtral":
        return ModelConfig(
            **{**common, "norm_topk_prob": True}, moe_layers=(True,) * n_layers,
            moe_intermediate_size=int(_need(cfg, "intermediate_size")),
        )
    if mt in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        return _deepseek_like(cfg, common)
    if mt == "gpt_oss":
        bias = bool(cfg["attention_bias"])
        return ModelConfig(
            **{**common, "norm_topk_prob": True},  # softmax over the top-k logits = renormalised top-k softmax
            qkv_bias=bias, o_bias=bias, attention_sinks=True, moe_layers=(True,) * n_layers,
            moe_intermediate_size=int(_need(cfg, "intermediate_size")), router_bias=True, expert_bias=True,
            glu="gpt_oss", swiglu_alpha=float(cfg["swiglu_alpha"]), swiglu_limit=float(cfg["swiglu_limit"]),
        )
    raise UserError(f"model_type '{mt}' is recognised but not implemented yet in the Flax model")


def _deepseek_like(cfg: dict, common: dict) -> ModelConfig:
    """DeepSeek-V2 (softmax, optional group max), DeepSeek-V3 and GLM-4.5-MoE (sigmoid, group top-2 sum)."""
    mt, n_layers, E = common["model_type"], common["num_layers"], common["num_experts"]
    if cfg.get("mlp_bias"):
        raise UserError(f"{mt} with mlp_bias = true is not supported: no released checkpoint uses it")
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    f = int(_need(cfg, "moe_intermediate_size"))
    kw: dict = dict(
        moe_layers=tuple(i >= first_dense for i in range(n_layers)),
        moe_intermediate_size=f,
        shared_expert_intermediate_size=f * int(cfg.get("n_shared_experts") or 0),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
    )
    if mt == "deepseek_v2":
        method = cfg.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise UserError(f"deepseek_v2 topk_method '{method}' is not supported (greedy, group_limited_greedy): "
                            "transformers does not run it either")
        # transformers' DeepSeek-V2 router never renormalises (it ignores norm_topk_prob)
        kw.update(scoring="softmax", group_score="max", norm_topk_prob=False)
        if method == "group_limited_greedy":
            kw.update(n_group=int(_need(cfg, "n_group")), topk_group=int(_need(cfg, "topk_group")))
    else:
        n_group = int(cfg.get("n_group") or 1)
        kw.update(scoring="sigmoid", group_score="top2", score_bias=True, n_group=n_group,
                  topk_group=int(cfg.get("topk_group") or n_group))
    groups, kept_groups = kw.get("n_group", 1), kw.get("topk_group", 1)
    least = 2 if kw["group_score"] == "top2" else 1
    if groups < 1 or E % groups or E // groups < least or not 1 <= kept_groups <= groups \
            or kept_groups * (E // groups) < common["top_k"]:
        raise UserError(f"{E} experts, n_group = {groups}, topk_group = {kept_groups}: the groups must split the "
                        f"experts evenly, hold at least {least} each, and the kept groups at least top-k: "
                        "the config is inconsistent")
    kw = {**common, **kw, "router_fp32": True}  # transformers keeps these gates in float32
    if mt == "glm4_moe":
        return ModelConfig(
            **kw, qkv_bias=bool(cfg.get("attention_bias", False)), qk_norm="head" if cfg.get("use_qk_norm") else "none",
        )
    nope, rope_dim = int(_need(cfg, "qk_nope_head_dim")), int(_need(cfg, "qk_rope_head_dim"))
    bias = bool(cfg.get("attention_bias", False))
    interleave = mt == "deepseek_v2" or bool(cfg.get("rope_interleave", True))
    return ModelConfig(
        **{**kw, "head_dim": nope + rope_dim,
           "rope": parse_rope(cfg, rope_dim, common["max_position_embeddings"], interleave)},
        qkv_bias=bias, o_bias=bias, q_lora_rank=int(cfg.get("q_lora_rank") or 0),
        kv_lora_rank=int(_need(cfg, "kv_lora_rank")), qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim,
        v_head_dim=int(_need(cfg, "v_head_dim")),
    )
