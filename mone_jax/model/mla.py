"""Multi-head latent attention (DeepSeek-V2 / V3), as transformers' ``DeepseekV2Attention`` computes it.

Queries come from ``q_proj`` or a low-rank ``q_a_proj -> RMSNorm -> q_b_proj``; keys and values from
a shared latent ``kv_a_proj_with_mqa`` (kv_lora_rank + one RoPE key shared by all heads) expanded
by ``kv_b_proj``. Only the last ``qk_rope_head_dim`` dims of queries and keys are rotated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mone_jax.base.config import ModelConfig
from mone_jax.model.layers import Linear, RMSNorm, attend, write_cache
from mone_jax.model.rope import apply_rope, yarn_mscale

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps


def mla_scale(cfg: ModelConfig) -> float:
    """Softmax scale: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under scaled RoPE."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.rope.type != "default" and cfg.rope.mscale_all_dim:
        scale *= yarn_mscale(cfg.rope.factor, cfg.rope.mscale_all_dim) ** 2
    return scale


class MLAttention(nnx.Module):
    """Multi-head latent attention; same call signature as :class:`mone_jax.model.causal_lm.Attention`."""

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
        return self._expanded(*self.project(x, cos, sin), bias)

    def project(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries [B, T, H, nope + rope] (rotated part last), the normed kv latent [B, T, r] and the
        rotated key shared by all heads [B, T, 1, rope]."""
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(B, T, self.heads, self.nope + self.rope)
        latent = self.kv_a_proj_with_mqa(x)
        k_rot = apply_rope(latent[..., self.rank :].reshape(B, T, 1, self.rope), cos, sin, self.interleave)
        q_rot = apply_rope(q[..., self.nope :], cos, sin, self.interleave)
        q = jnp.concatenate([q[..., : self.nope], q_rot], axis=-1)
        return q, self.kv_a_layernorm(latent[..., : self.rank]), k_rot

    def _expanded(self, q, c, k_rot, bias):
        """Attention with keys and values expanded per head from the latent, as transformers computes it."""
        B, T, H = *c.shape[:2], self.heads
        kv = self.kv_b_proj(c).reshape(B, T, H, self.nope + self.v_dim)
        k = jnp.concatenate([kv[..., : self.nope], jnp.broadcast_to(k_rot, (B, T, H, self.rope))], axis=-1)
        out = attend(q, k, kv[..., self.nope :], bias, self.scale)
        return self.o_proj(out.reshape(B, T, H * self.v_dim))

    def init_cache(self, batch: int, slots: int, dtype) -> tuple[jax.Array, jax.Array]:
        """An empty compressed cache: the normed kv latent [B, S, r] and the rotated key [B, S, rope]."""
        return jnp.zeros((batch, slots, self.rank), dtype), jnp.zeros((batch, slots, self.rope), dtype)

    def cached(self, x, cos, sin, bias, cache, start, prefill: bool):
        """Like ``Attention.cached``. Steps never expand the cache: the key projection is absorbed into
        the queries and the value projection applied after the softmax-weighted sum of latents."""
        q, c, k_rot = self.project(x, cos, sin)
        cache = write_cache(cache, (c, k_rot[:, :, 0]), start)
        if prefill:
            return self._expanded(q, c, k_rot, bias), cache
        B, T, H = *c.shape[:2], self.heads
        w = self.kv_b_proj.kernel[...].reshape(self.rank, H, self.nope + self.v_dim)
        f32 = jnp.float32
        q_lat = jnp.einsum("bthn,rhn->bthr", q[..., : self.nope], w[..., : self.nope], preferred_element_type=f32)
        s = (jnp.einsum("bthr,bsr->bhts", q_lat.astype(c.dtype), cache[0], preferred_element_type=f32)
             + jnp.einsum("bthp,bsp->bhts", q[..., self.nope :], cache[1], preferred_element_type=f32))
        s = s * self.scale + bias[:, None]
        m = s.max(-1, keepdims=True)
        p = jnp.exp(s - m)
        den = p.sum(-1, keepdims=True).transpose(0, 2, 1, 3)  # [B, T, H, 1]
        o_lat = jnp.einsum("bhts,bsr->bthr", p.astype(c.dtype), cache[0], preferred_element_type=f32)
        o = jnp.einsum("bthr,rhv->bthv", o_lat.astype(c.dtype), w[..., self.nope :], preferred_element_type=f32)
        return self.o_proj((o / den).astype(c.dtype).reshape(B, T, H * self.v_dim)), cache
