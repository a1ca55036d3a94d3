"""Family-neutral model configuration (plain, hashable data; parsed from Hugging Face configs by
:mod:`mone_jax.convert.hf_config`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


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
    # longrope (Phi): per-frequency divisors for sequences up to / beyond original_max_position_embeddings
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    # Phi-MoE: the cos/sin scale for sequences up to / beyond original_max_position_embeddings (else the type's own)
    short_mscale: float | None = None
    long_mscale: float | None = None

    @property
    def by_length(self) -> bool:
        """Whether the tables depend on the sequence length (short vs long, split at
        ``original_max_position_embeddings``)."""
        return self.type == "longrope" or self.short_mscale is not None


@dataclass(frozen=True)
class DeltaNetConfig:
    """Gated DeltaNet linear-attention layers (Qwen3-Next / Qwen3.5), see :mod:`mone_jax.model.deltanet`."""

    key_heads: int
    value_heads: int  # a multiple of key_heads: each query/key head serves value_heads // key_heads heads
    key_dim: int
    value_dim: int
    conv_kernel: int = 4
    fused_proj: bool = False  # Qwen3-Next: in_proj_qkvz / in_proj_ba grouped per key head
    chunk: int = 64  # tokens per chunk of the recurrence


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
    post_norm: bool = False  # OLMo2 / FlexOlmo: RMSNorm on each sublayer's output (none on its input)
    # attention
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # "none" | "proj" (OLMoE: over the whole projection) | "head" (Qwen3)
    qk_norm_after_rope: bool = False  # HunYuan: the per-head q/k norm applies to the rotated q/k
    clip_qkv: float | None = None
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full attention
    attention_sinks: bool = False  # GPT-OSS: a learned per-head logit joins each softmax
    attn_output_gate: bool = False  # Qwen3-Next: q_proj also gives a per-head gate, output * sigmoid(gate)
    rms_norm_unit_offset: bool = False  # Qwen3-Next: RMSNorm scales by (1 + weight)
    layer_norm: bool = False  # Phi-MoE: the decoder and final norms are LayerNorms with bias (eps rms_norm_eps)
    lm_head_bias: bool = False  # Phi-MoE: logits = h @ lm_head + bias
    # linear-attention layers (Qwen3-Next / Qwen3.5): per layer True = Gated DeltaNet instead of attention
    linear_layers: tuple[bool, ...] = ()
    deltanet: DeltaNetConfig | None = None
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
    scoring: str = "softmax"  # "softmax" | "sigmoid" | "sparsemixer" (Phi-MoE top-2, see mone_jax.model.sparsemixer)
    sparsemixer_eps: float = 0.01  # sparsemixer: relative logit gap beyond which experts leave the softmax
    group_score: str = "max"  # group-limited routing: "max" (DeepSeek-V2) | "top2" (sum of top 2: V3/GLM)
    n_group: int = 1
    topk_group: int = 1  # groups kept per token (selection is group-limited when < n_group)
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    router_bias: bool = False  # GPT-OSS: logits = x @ W + b
    score_bias: bool = False  # DeepSeek-V3/GLM e_score_correction_bias: added to scores to choose experts only
    router_fp32: bool = False  # router weight kept and applied in float32 (transformers' keep-in-fp32 gates)
    expert_bias: bool = False  # GPT-OSS: biases on the experts' gate_up and down projections
    glu: str = "swiglu"  # "swiglu" | "clamped_swiglu" (GPT-OSS: clamped, alpha-scaled sigmoid, up + 1)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, m in enumerate(self.moe_layers) if m]

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)
