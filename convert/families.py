"""The family registry: everything mone-jax knows about each Hugging Face ``model_type``, one record each.

A record holds the checkpoint names of the MoE block (read by the loader, the exporter, ``inspect``
and the state-dict writer), the transformers config-class defaults for keys a config.json may
omit, and a parse hook turning the config dict into :class:`~mone_jax.base.config.ModelConfig` fields
(MoE layout, routing, attention options, sliding windows). Transformers class names are resolved
through transformers' own auto mappings (see ``modeling_mone.py``), so they are not repeated here.
Math lives in the core model; a family whose math is new adds a block there and a flag in ModelConfig.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from mone_jax.base.config import DeltaNetConfig, ModelConfig
from mone_jax.base.errors import UserError
from mone_jax.convert.hf_config import common_fields, need, parse_rope, sliding_windows

STD_PROJ = ("gate_proj", "up_proj", "down_proj")
# Compressed model types written by the PyTorch reference (zxgx/mode-pd): <base>_compressed.
COMPRESSED_SUFFIX = "_compressed"


@dataclass(frozen=True)
class Family:
    """One supported ``model_type``: names of its MoE block (relative to ``model.layers.<l>.``), config
    defaults and the hook ``parse(cfg, common) -> ModelConfig kwargs`` (``common``: :func:`common_fields`)."""

    model_type: str
    parse: Callable[[dict, dict], dict]
    num_experts_key: str  # config.json key of the routed expert count
    defaults: Mapping = field(default_factory=dict)
    moe_module: str = "mlp"  # Mixtral: "block_sparse_moe"
    router: str = "gate"  # GPT-OSS: "router"
    proj: tuple[str, str, str] = STD_PROJ  # per-expert (gate, up, down) projection names
    shared_expert: str | None = None  # shared expert module under moe_module
    shared_expert_gate: str | None = None  # Qwen2-MoE sigmoid gate of the shared expert
    router_bias: bool = False  # GPT-OSS router bias
    score_bias: str | None = None  # DeepSeek-V3 / GLM "e_score_correction_bias" (under router)
    score_bias_module: str | None = None  # where score_bias lives instead, under moe_module ("": MiniMax-M2's block)
    score_bias_2d: bool = False  # ERNIE-4.5 stores the score-correction bias as [1, E]
    fused_on_disk: bool = False  # GPT-OSS: experts.gate_up_proj [E, d, 2f] interleaved, biases
    dense_mlp_module: str = "mlp"  # module of dense (non-MoE) layers
    attn_names: Mapping[str, str] = field(default_factory=dict)  # attention module name -> checkpoint name
    prepare: Callable[[dict], dict] | None = None  # config.json dict -> the keys the parse reads (HunYuan)

    def moe_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.moe_module}"

    def expert_key(self, layer: int, expert: int, which: int) -> str:
        """Key of expert ``expert``'s projection ``which`` (0 gate, 1 up, 2 down), per-expert layout."""
        return f"{self.moe_prefix(layer)}.experts.{expert}.{self.proj[which]}.weight"

    def router_key(self, layer: int, what: str = "weight") -> str:
        return f"{self.moe_prefix(layer)}.{self.router}.{what}"

    def score_bias_key(self, layer: int) -> str:
        if self.score_bias_module is None:
            return self.router_key(layer, self.score_bias)
        return ".".join(p for p in (self.moe_prefix(layer), self.score_bias_module, self.score_bias) if p)

    def router_rows(self, layer: int) -> list[str]:
        """Keys of the router tensors with one row per expert (weight, bias, score-correction bias)."""
        whats = ["weight", "bias" if self.router_bias else None]
        return [self.router_key(layer, w) for w in whats if w] + ([self.score_bias_key(layer)] if self.score_bias else [])


# ------------------------------------------------------------------------------------------ parse hooks


def _olmoe(cfg: dict, c: dict) -> dict:
    bias = bool(cfg.get("attention_bias", False))
    n = c["num_layers"]
    return dict(qkv_bias=bias, o_bias=bias, qk_norm="proj", clip_qkv=cfg.get("clip_qkv"), moe_layers=(True,) * n,
                moe_intermediate_size=int(need(cfg, "intermediate_size")), sliding_windows=sliding_windows(cfg, n))


def _qwen_moe_layers(cfg: dict, n_layers: int, n_experts: int) -> tuple[bool, ...]:
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    only = set(cfg.get("mlp_only_layers") or [])
    return tuple(i not in only and n_experts > 0 and (i + 1) % step == 0 for i in range(n_layers))


def _qwen_windows(cfg: dict, n: int) -> tuple[int | None, ...]:
    if not cfg.get("use_sliding_window", False):
        return (None,) * n
    if cfg["model_type"] == "qwen2_moe" and not cfg.get("layer_types") and cfg.get("sliding_window"):
        max_window = int(cfg.get("max_window_layers", n))
        return tuple(int(cfg["sliding_window"]) if (i + 1) % 2 and i < max_window else None for i in range(n))
    return sliding_windows(cfg, n)


def _qwen2_moe(cfg: dict, c: dict) -> dict:
    fs = int(cfg.get("shared_expert_intermediate_size", 0) or 0)
    return dict(qkv_bias=bool(cfg.get("qkv_bias", True)), moe_layers=_qwen_moe_layers(cfg, c["num_layers"], c["num_experts"]),
                moe_intermediate_size=int(need(cfg, "moe_intermediate_size")), shared_expert_intermediate_size=fs,
                shared_expert_gate=bool(fs), sliding_windows=_qwen_windows(cfg, c["num_layers"]))


def _qwen3_moe(cfg: dict, c: dict) -> dict:
    bias = bool(cfg.get("attention_bias", False))
    return dict(qkv_bias=bias, o_bias=bias, qk_norm="head",
                moe_layers=_qwen_moe_layers(cfg, c["num_layers"], c["num_experts"]),
                moe_intermediate_size=int(need(cfg, "moe_intermediate_size")),
                sliding_windows=_qwen_windows(cfg, c["num_layers"]))


def _mixtral(cfg: dict, c: dict) -> dict:
    n = c["num_layers"]
    return dict(norm_topk_prob=True, moe_layers=(True,) * n, moe_intermediate_size=int(need(cfg, "intermediate_size")),
                sliding_windows=sliding_windows(cfg, n))


def _gpt_oss(cfg: dict, c: dict) -> dict:
    bias, n, rope = bool(cfg["attention_bias"]), c["num_layers"], c["rope"]
    if not cfg.get("rope_parameters") and not cfg.get("rope_scaling"):  # the released models' YaRN
        yarn = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}
        rope = parse_rope({**cfg, "rope_scaling": yarn}, c["head_dim"], c["max_position_embeddings"])

    def alternate(n: int) -> list[str]:
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]

    return dict(rope=rope, norm_topk_prob=True,  # softmax over the top-k logits = renormalised top-k softmax
                qkv_bias=bias, o_bias=bias, attention_sinks=True, moe_layers=(True,) * n,
                moe_intermediate_size=int(need(cfg, "intermediate_size")), router_bias=True, expert_bias=True,
                glu="clamped_swiglu", swiglu_alpha=float(cfg["swiglu_alpha"]), swiglu_limit=float(cfg["swiglu_limit"]),
                sliding_windows=sliding_windows(cfg, n, alternate))


def _deepseek_moe(cfg: dict, c: dict) -> dict:
    """The DeepSeek-style MoE layout and router: dense first layers, shared experts, float32 gate;
    DeepSeek-V2 softmax (optional group max), else sigmoid with score-correction bias and groups scored
    by their top-2 sum (DeepSeek-V3 and the families that copied its router)."""
    mt, n_layers, E = c["model_type"], c["num_layers"], c["num_experts"]
    if cfg.get("mlp_bias"):
        raise UserError(f"{mt} with mlp_bias = true is not supported: no released checkpoint uses it")
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    f = int(need(cfg, "moe_intermediate_size"))
    kw: dict = dict(
        moe_layers=tuple(i >= first_dense for i in range(n_layers)), moe_intermediate_size=f,
        shared_expert_intermediate_size=f * int(cfg.get("n_shared_experts") or 0),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
        router_fp32=True,  # transformers keeps these gates in float32
        sliding_windows=(None,) * n_layers,  # full attention unless the family's hook says otherwise
    )
    if mt == "deepseek_v2":
        method = cfg.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise UserError(f"deepseek_v2 topk_method '{method}' is not supported (greedy, group_limited_greedy): "
                            "transformers does not run it either")
        # transformers' DeepSeek-V2 router never renormalises (it ignores norm_topk_prob)
        kw.update(scoring="softmax", group_score="max", norm_topk_prob=False)
        if method == "group_limited_greedy":
            kw.update(n_group=int(need(cfg, "n_group")), topk_group=int(need(cfg, "topk_group")))
    else:
        n_group = int(cfg.get("n_group") or 1)
        kw.update(scoring="sigmoid", group_score="top2", score_bias=True, n_group=n_group,
                  topk_group=int(cfg.get("topk_group") or n_group))
    groups, kept_groups = kw.get("n_group", 1), kw.get("topk_group", 1)
    least = 2 if kw["group_score"] == "top2" else 1
    if groups < 1 or E % groups or E // groups < least or not 1 <= kept_groups <= groups \
            or kept_groups * (E // groups) < c["top_k"]:
        raise UserError(f"{E} experts, n_group = {groups}, topk_group = {kept_groups}: the groups must split the "
                        f"experts evenly, hold at least {least} each, and the kept groups at least top-k: "
                        "the config is inconsistent")
    return kw


def _deepseek_mla(cfg: dict, c: dict) -> dict:
    """DeepSeek-V2 / V3: multi-head latent attention, interleaved RoPE on the rotary part."""
    nope, rope_dim = int(need(cfg, "qk_nope_head_dim")), int(need(cfg, "qk_rope_head_dim"))
    bias = bool(cfg.get("attention_bias", False))
    interleave = c["model_type"] == "deepseek_v2" or bool(cfg.get("rope_interleave", True))
    return {**_deepseek_moe(cfg, c), "head_dim": nope + rope_dim,
            "rope": parse_rope(cfg, rope_dim, c["max_position_embeddings"], interleave),
            "qkv_bias": bias, "o_bias": bias, "q_lora_rank": int(cfg.get("q_lora_rank") or 0),
            "kv_lora_rank": int(need(cfg, "kv_lora_rank")), "qk_nope_head_dim": nope, "qk_rope_head_dim": rope_dim,
            "v_head_dim": int(need(cfg, "v_head_dim"))}


def _glm4_moe(cfg: dict, c: dict) -> dict:
    """GLM-4.5-MoE: standard attention (partial RoPE, optional per-head q/k norm), DeepSeek-V3 router."""
    return {**_deepseek_moe(cfg, c), "qkv_bias": bool(cfg.get("attention_bias", False)),
            "qk_norm": "head" if cfg.get("use_qk_norm") else "none"}


def _dots1(cfg: dict, c: dict) -> dict:
    """dots.llm1: Qwen3-style attention (per-head q/k norm, sliding layers from max_window_layers), DeepSeek-V3
    router."""
    n, first_sliding = c["num_layers"], int(cfg.get("max_window_layers") or c["num_layers"])
    bias = bool(cfg.get("attention_bias", False))
    return {**_deepseek_moe(cfg, c), "qkv_bias": bias, "o_bias": bias, "qk_norm": "head",
            "sliding_windows": sliding_windows(cfg, n, lambda n: ["sliding_attention" if i >= first_sliding
                                                                  else "full_attention" for i in range(n)])}


def _glm4_moe_lite(cfg: dict, c: dict) -> dict:
    """GLM-4.7-Flash: DeepSeek-V3 (MLA, sigmoid router with score-correction bias), dense / MoE layers from
    ``mlp_layer_types``."""
    n = c["num_layers"]
    types = cfg.get("mlp_layer_types") or ["dense"] + ["sparse"] * (n - 1)
    if len(types) != n or set(types) - {"dense", "sparse"}:
        raise UserError(f"mlp_layer_types must list 'dense' or 'sparse' for each of the {n} layers, got {types}: "
                        "the config is inconsistent")
    return {**_deepseek_mla(cfg, c), "moe_layers": tuple(t == "sparse" for t in types)}


def _minimax_m2(cfg: dict, c: dict) -> dict:
    """MiniMax-M2: q/k RMSNorm over the whole projection, partial RoPE from the legacy ``rotary_dim``, sigmoid
    router with a score-correction bias (selection only), top-k renormalised."""
    n, rope = c["num_layers"], c["rope"]
    if cfg.get("rotary_dim"):
        partial = int(cfg["rotary_dim"]) / c["head_dim"]
        rope = parse_rope({"partial_rotary_factor": partial, **cfg}, c["head_dim"], c["max_position_embeddings"])
    return dict(rope=rope, qk_norm="proj", moe_layers=(True,) * n, scoring="sigmoid", score_bias=True,
                norm_topk_prob=True, moe_intermediate_size=int(need(cfg, "intermediate_size")),
                sliding_windows=(None,) * n)


def _hunyuan_prepare(cfg: dict) -> dict:
    """HunYuan-MoE config keys as the other families spell them: per-layer lists that repeat one value
    collapsed, ``moe_topk`` as ``num_experts_per_tok``, NTK-alpha RoPE as the RoPE base it stretches to."""
    if cfg.get("use_cla"):
        raise UserError("hunyuan_v1_moe with use_cla = true (cross-layer attention) is not supported: "
                        "transformers does not run it either")
    out = dict(cfg)
    for key in ("moe_topk", "num_experts", "num_shared_expert", "moe_intermediate_size"):
        if isinstance(out.get(key), list):
            if len(set(out[key])) != 1:
                raise UserError(f"hunyuan_v1_moe with per-layer {key} {out[key]} is not supported: transformers "
                                "uses one value for every layer")
            out[key] = out[key][0]
    if out.get("moe_topk") is not None:  # what transformers reads (num_experts_per_tok is its alias)
        out["num_experts_per_tok"] = out["moe_topk"]
    rope = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
    if rope.get("alpha") and rope.get("rope_type", rope.get("type")) == "dynamic":  # transformers' ntk_alpha
        dim = int(out.get("head_dim") or out["hidden_size"] // out["num_attention_heads"])
        theta = float(rope.get("rope_theta", out.get("rope_theta", 10000.0))) * float(rope["alpha"]) ** (dim / (dim - 2))
        out.update(rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": theta})
    return out


def _hunyuan_v1_moe(cfg: dict, c: dict) -> dict:
    """HunYuan-MoE: per-head q/k RMSNorm after RoPE, float32 softmax router (``gate.wg``), renormalised top-k,
    experts and the ungated shared MLP of ``intermediate_size`` in every layer."""
    n, bias, f = c["num_layers"], bool(cfg.get("attention_bias", False)), int(need(cfg, "intermediate_size"))
    return dict(qkv_bias=bias, o_bias=bias, qk_norm="head", qk_norm_after_rope=True, moe_layers=(True,) * n,
                moe_intermediate_size=f, shared_expert_intermediate_size=f, norm_topk_prob=True, router_fp32=True,
                sliding_windows=(None,) * n)


def _flex_olmo(cfg: dict, c: dict) -> dict:
    """FlexOlmo: OLMo2-style post-norm layers with q/k RMSNorm over the whole projection, softmax router."""
    bias, n = bool(cfg.get("attention_bias", False)), c["num_layers"]
    return dict(post_norm=True, qkv_bias=bias, o_bias=bias, qk_norm="proj", moe_layers=(True,) * n,
                moe_intermediate_size=int(need(cfg, "intermediate_size")), sliding_windows=(None,) * n)


def _phimoe(cfg: dict, c: dict) -> dict:
    """Phi-MoE: LayerNorms with bias, attention and lm_head biases, SparseMixer top-2 router, and for scaled
    RoPE its own cos/sin scale per length (``short_mscale`` / ``long_mscale``). transformers' Phi-MoE RoPE
    recomputes the frequencies without the length, so longrope keeps ``short_factor`` at every length; the
    model follows it (Microsoft's original code and vLLM switch to ``long_factor``)."""
    n, rope = c["num_layers"], c["rope"]
    if c["top_k"] != 2:
        raise UserError(f"phimoe with num_experts_per_tok = {c['top_k']} is not supported: SparseMixer routes "
                        "every token to exactly 2 experts (transformers ignores the value)")
    if rope.type != "default":
        params = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
        if params.get("short_mscale") is None or params.get("long_mscale") is None:
            raise UserError(f"phimoe with {rope.type} RoPE needs short_mscale and long_mscale in rope_parameters: "
                            "the config is incomplete")
        rope = replace(rope, short_mscale=float(params["short_mscale"]), long_mscale=float(params["long_mscale"]),
                       long_factor=rope.short_factor)
    bias = bool(cfg.get("attention_bias", False))
    return dict(rope=rope, layer_norm=True, lm_head_bias=bool(cfg.get("lm_head_bias", False)), qkv_bias=bias,
                o_bias=bias, moe_layers=(True,) * n, moe_intermediate_size=int(need(cfg, "intermediate_size")),
                scoring="sparsemixer", sparsemixer_eps=float(cfg["router_jitter_noise"]),
                sliding_windows=sliding_windows(cfg, n))


def _ernie_prepare(cfg: dict) -> dict:
    """ERNIE-4.5 writes top-k as ``moe_k`` (what transformers reads; num_experts_per_tok is its alias)."""
    return {**cfg, "num_experts_per_tok": cfg["moe_k"]} if cfg.get("moe_k") is not None else cfg


def _ernie4_5_moe(cfg: dict, c: dict) -> dict:
    """ERNIE-4.5-MoE: MoE layers from start / end / interval, interleaved RoPE, float32 softmax router whose
    statistics buffer (``moe_statics.e_score_correction_bias``) shifts the choice only, renormalised top-k,
    shared experts."""
    if cfg.get("use_bias"):
        raise UserError("ernie4_5_moe with use_bias = true is not supported: no released checkpoint uses it")
    n, f = c["num_layers"], int(need(cfg, "moe_intermediate_size"))
    start, step = int(cfg["moe_layer_start_index"]), int(cfg["moe_layer_interval"])
    end = n - 1 if int(cfg["moe_layer_end_index"]) == -1 else int(cfg["moe_layer_end_index"])
    return dict(rope=parse_rope(cfg, c["head_dim"], c["max_position_embeddings"], interleave=True),
                moe_layers=tuple((i + 1) % step == 0 and start <= i <= end for i in range(n)),
                moe_intermediate_size=f, shared_expert_intermediate_size=f * int(cfg.get("moe_num_shared_experts") or 0),
                score_bias=True, norm_topk_prob=True, router_fp32=True, sliding_windows=(None,) * n)


def _qwen3_next(cfg: dict, c: dict) -> dict:
    """Qwen3-Next and the Qwen3.5-MoE text model: Gated DeltaNet layers between gated full-attention layers
    (per-head q/k norm, partial RoPE), RMSNorms scaling by 1 + weight, routed experts plus a gated shared
    expert. Qwen3.5-MoE has only MoE layers and always renormalises the top-k weights."""
    n, mt = c["num_layers"], c["model_type"]
    interval = int(cfg.get("full_attention_interval") or 4)
    types = cfg.get("layer_types") or ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                       for i in range(n)]
    if len(types) != n or not set(types) <= {"linear_attention", "full_attention"}:
        raise UserError(f"{mt} layer_types {types} is not one of linear_attention / full_attention per layer: "
                        "repair config.json")
    kh, vh = int(need(cfg, "linear_num_key_heads")), int(need(cfg, "linear_num_value_heads"))
    if kh < 1 or vh % kh:
        raise UserError(f"linear_num_value_heads = {vh} is not a multiple of linear_num_key_heads = {kh}: "
                        "the config is inconsistent")
    text = mt == "qwen3_5_moe_text"
    fs = int(cfg.get("shared_expert_intermediate_size") or 0)
    bias = bool(cfg.get("attention_bias", False))
    return dict(
        qkv_bias=bias, o_bias=bias, qk_norm="head", attn_output_gate=True, rms_norm_unit_offset=True,
        linear_layers=tuple(t == "linear_attention" for t in types),
        deltanet=DeltaNetConfig(key_heads=kh, value_heads=vh, key_dim=int(need(cfg, "linear_key_head_dim")),
                                value_dim=int(need(cfg, "linear_value_head_dim")),
                                conv_kernel=int(need(cfg, "linear_conv_kernel_dim")), fused_proj=not text),
        moe_layers=(True,) * n if text else _qwen_moe_layers(cfg, n, c["num_experts"]),
        moe_intermediate_size=int(need(cfg, "moe_intermediate_size")), shared_expert_intermediate_size=fs,
        shared_expert_gate=bool(fs), norm_topk_prob=True if text else c["norm_topk_prob"],
        sliding_windows=(None,) * n)


# --------------------------------------------------------------------------------------------- registry

_DS_SHARED = dict(shared_expert="shared_experts")
FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("olmoe", _olmoe, "num_experts"),
    Family("qwen2_moe", _qwen2_moe, "num_experts", shared_expert="shared_expert",
           shared_expert_gate="shared_expert_gate"),
    Family("qwen3_moe", _qwen3_moe, "num_experts"),
    Family("mixtral", _mixtral, "num_local_experts", moe_module="block_sparse_moe", proj=("w1", "w3", "w2")),
    Family("deepseek_v2", _deepseek_mla, "n_routed_experts", **_DS_SHARED, defaults=dict(
        first_k_dense_replace=0, n_shared_experts=2, routed_scaling_factor=1.0, topk_method="greedy",
        q_lora_rank=1536)),
    Family("deepseek_v3", _deepseek_mla, "n_routed_experts", **_DS_SHARED, score_bias="e_score_correction_bias",
           defaults=dict(first_k_dense_replace=3, n_shared_experts=1, routed_scaling_factor=2.5, n_group=8,
                         topk_group=4, norm_topk_prob=True, rope_interleave=True, q_lora_rank=1536)),
    Family("glm4_moe", _glm4_moe, "n_routed_experts", **_DS_SHARED, score_bias="e_score_correction_bias",
           defaults=dict(first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=1.0, n_group=1,
                         topk_group=1, norm_topk_prob=True, partial_rotary_factor=0.5)),
    Family("dots1", _dots1, "n_routed_experts", **_DS_SHARED, score_bias="e_score_correction_bias"),
    Family("glm4_moe_lite", _glm4_moe_lite, "n_routed_experts", **_DS_SHARED, score_bias="e_score_correction_bias",
           defaults=dict(n_shared_experts=1, routed_scaling_factor=1.8, n_group=1, topk_group=1, norm_topk_prob=True,
                         rope_interleave=True, q_lora_rank=768)),
    Family("minimax_m2", _minimax_m2, "num_local_experts", moe_module="block_sparse_moe", proj=("w1", "w3", "w2"),
           score_bias="e_score_correction_bias", score_bias_module=""),
    Family("phimoe", _phimoe, "num_local_experts", moe_module="block_sparse_moe", proj=("w1", "w3", "w2"),
           defaults=dict(num_local_experts=16, num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6,
                         router_jitter_noise=0.01)),
    Family("hunyuan_v1_moe", _hunyuan_v1_moe, "num_experts", router="gate.wg", shared_expert="shared_mlp",
           attn_names={"q_norm": "query_layernorm", "k_norm": "key_layernorm"}, prepare=_hunyuan_prepare),
    Family("flex_olmo", _flex_olmo, "num_experts"),
    Family("ernie4_5_moe", _ernie4_5_moe, "moe_num_experts", **_DS_SHARED, score_bias="e_score_correction_bias",
           score_bias_module="moe_statics", score_bias_2d=True, prepare=_ernie_prepare,
           defaults=dict(moe_k=6, moe_num_experts=64, moe_num_shared_experts=2, moe_layer_start_index=1,
                         moe_layer_end_index=-1, moe_layer_interval=1, moe_intermediate_size=1536,
                         tie_word_embeddings=True, rms_norm_eps=1e-5)),
    *(Family(mt, _qwen3_next, "num_experts", shared_expert="shared_expert", shared_expert_gate="shared_expert_gate",
             defaults=dict(head_dim=256, partial_rotary_factor=0.25, norm_topk_prob=True, linear_conv_kernel_dim=4,
                           linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
                           linear_num_value_heads=32)) for mt in ("qwen3_next", "qwen3_5_moe_text")),
    Family("gpt_oss", _gpt_oss, "num_local_experts", router="router", router_bias=True, fused_on_disk=True,
           defaults=dict(attention_bias=True, sliding_window=128, swiglu_alpha=1.702, swiglu_limit=7.0,
                         rope_theta=150000.0)),
]}

_LLAMA4 = "Llama-4 scales the expert INPUT by the routing weight, so a novice (constant output) is not defined"
REFUSED = {"llama4": _LLAMA4, "llama4_text": _LLAMA4}


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def family(model_type: str) -> Family:
    """The record of ``model_type`` (mode-pd ``<base>_compressed`` types map to their base); UserError
    naming the supported families otherwise."""
    base = model_type.removesuffix(COMPRESSED_SUFFIX)
    if base in REFUSED:
        raise UserError(f"model_type '{model_type}' is not supported: {REFUSED[base]}. Supported: {supported()}")
    if base not in FAMILIES:
        raise UserError(f"model_type '{model_type}' is not supported. Supported: {supported()}")
    return FAMILIES[base]


def parse_config(raw: dict) -> ModelConfig:
    """A config.json dict -> :class:`ModelConfig` (UserError on anything unsupported or inconsistent)."""
    mt = raw.get("model_type")
    if not mt:
        raise UserError("config.json has no 'model_type': pass a Hugging Face model folder")
    fam = family(mt)
    cfg = {**fam.defaults, **raw, "model_type": fam.model_type}
    try:
        cfg = fam.prepare(cfg) if fam.prepare else cfg
        common = common_fields(cfg, fam.num_experts_key)
        return ModelConfig(**{**common, **fam.parse(cfg, common)})
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"config.json holds an invalid value ({e}): repair it") from None


def num_experts_key(raw: dict, fam: Family) -> str:
    """The config.json key holding the routed expert count (transformers 5 writes Qwen3-MoE's as
    ``num_local_experts`` where hub checkpoints say ``num_experts``)."""
    for key in (fam.num_experts_key, "num_local_experts", "num_experts", "n_routed_experts"):
        if isinstance(raw.get(key), int) and raw[key] > 0:
            return key
    raise UserError(f"config.json has no valid '{fam.num_experts_key}': is this a {fam.model_type} MoE model?")

