"""Building blocks shared by every attention and MoE variant: parameters, RMSNorm, Linear, softmax attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Buffer(nnx.Variable):
    """Non-trainable array state (expert id maps, score-correction biases)."""


def normal_param(rngs: nnx.Rngs, shape, dtype, std: float = 0.02) -> nnx.Param:
    """A parameter drawn from N(0, std^2) (placeholder values: checkpoints overwrite them)."""
    return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)``; kernel stored [in, out] (the transpose of torch's)."""

    def __init__(self, d_in: int, d_out: int, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = normal_param(rngs, (d_in, d_out), dtype)
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x, self.kernel[...])
        return y + self.bias[...] if self.bias is not None else y


def attend(q, k, v, bias, scale: float, sinks: jax.Array | None = None) -> jax.Array:
    """Softmax attention, grouped-query. q [B,T,H,D], k [B,S,KV,D], v [B,S,KV,Dv], bias [B,T,S] additive.

    ``sinks`` [H] (GPT-OSS): a learned per-head logit that joins each softmax and is then dropped.
    """
    B, T, H, D = q.shape
    KV = k.shape[2]
    qg = q.reshape(B, T, KV, H // KV, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    s = s + bias[:, None, None]
    if sinks is None:
        p = jax.nn.softmax(s, axis=-1)
    else:
        sk = jnp.broadcast_to(sinks.reshape(KV, H // KV)[None, :, :, None, None], (*s.shape[:-1], 1))
        p = jax.nn.softmax(jnp.concatenate([s, sk.astype(s.dtype)], -1), axis=-1)[..., :-1]
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v)
    return out.reshape(B, T, H, v.shape[-1])
