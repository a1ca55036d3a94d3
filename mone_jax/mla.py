"""Multi-head latent attention (DeepSeek-V2 / V3), as transformers' ``DeepseekV2Attention`` computes it.

Queries come from ``q_proj`` or a low-rank ``q_a_proj -> RMSNorm -> q_b_proj``; keys and values from
a shared latent ``kv_a_proj_with_mqa`` (kv_lora_rank + one RoPE key shared by all heads) expanded
by ``kv_b_proj``. Only the last ``qk_rope_head_dim`` dims of queries and keys are rotated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mone_jax.config import ModelConfig
from mone_jax.layers import Linear, RMSNorm, attend
from mone_jax.rope import apply_rope, yarn_mscale

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps


def mla_scale(cfg: ModelConfig) -> float:
    """Softmax scale: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under scaled RoPE."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.rope.type != "default" and cfg.rope.mscale_all_dim:
        scale *= yarn_mscale(cfg.rope.factor, cfg.rope.mscale_all_dim) ** 2
    return scale


class MLAttention(nnx.Module):
    """Multi-head latent attention; same call signature as :class:`mone_jax.model.Attention`."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, H = cfg.hidden_size, cfg.num_heads
        nope, rope, vd, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        qk = nope + rope
        if cfg.q_lora_rank:
            self.q_proj = None
            self.q_a_proj = Linear(d, cfg.q_lora_rank, cfg.qkv_bias, dtype, rngs)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS, dtype)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * qk, False, dtype, rngs)
        else:
            self.q_proj = Linear(d, H * qk, False, dtype, rngs)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        self.kv_a_proj_with_mqa = Linear(d, r + rope, cfg.qkv_bias, dtype, rngs)
        self.kv_a_layernorm = RMSNorm(r, LATENT_NORM_EPS, dtype)
        self.kv_b_proj = Linear(r, H * (nope + vd), False, dtype, rngs)
        self.o_proj = Linear(H * vd, d, cfg.o_bias, dtype, rngs)
        self.heads, self.nope, self.rope, self.v_dim, self.rank = H, nope, rope, vd, r
        self.scale = mla_scale(cfg)
        self.interleave = cfg.rope.interleave

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array) -> jax.Array:
        B, T, _ = x.shape
        H = self.heads
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(B, T, H, self.nope + self.rope)
        latent = self.kv_a_proj_with_mqa(x)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent[..., : self.rank])).reshape(B, T, H, self.nope + self.v_dim)
        k_rot = apply_rope(latent[..., self.rank :].reshape(B, T, 1, self.rope), cos, sin, self.interleave)
        q_rot = apply_rope(q[..., self.nope :], cos, sin, self.interleave)
        q = jnp.concatenate([q[..., : self.nope], q_rot], axis=-1)
        k = jnp.concatenate([kv[..., : self.nope], jnp.broadcast_to(k_rot, (B, T, H, self.rope))], axis=-1)
        out = attend(q, k, kv[..., self.nope :], bias, self.scale)
        return self.o_proj(out.reshape(B, T, H * self.v_dim))
