"""Building blocks shared by every attention and MoE variant: parameters, RMSNorm / LayerNorm, Linear, softmax
attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Buffer(nnx.Variable):
    """Non-trainable array state (expert id maps, score-correction biases)."""


class ExpertParam(nnx.Param):
    """A routed-expert parameter: one row per expert (split over the mesh's ``expert`` axis)."""


class ExpertBuffer(Buffer):
    """Non-trainable per-expert rows (the kept experts' original ids), split like :class:`ExpertParam`."""


def normal_param(rngs: nnx.Rngs, shape, dtype, std: float = 0.02, kind: type[nnx.Param] = nnx.Param) -> nnx.Param:
    """A parameter drawn from N(0, std^2) (placeholder values: checkpoints overwrite them)."""
    return kind((jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype))


class RMSNorm(nnx.Module):
    """RMS norm times ``weight``, or with ``unit_offset`` (Qwen3-Next) times ``1 + weight`` in float32."""

    def __init__(self, dim: int, eps: float, dtype, unit_offset: bool = False):
        self.weight = nnx.Param(jnp.zeros((dim,), dtype) if unit_offset else jnp.ones((dim,), dtype))
        self.eps = eps
        self.unit_offset = unit_offset

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (xf * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * xf.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias (Phi-MoE): mean and variance over the last axis in float32."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` in the inputs' dtype, accumulated in float32: XLA:CPU multiplies bf16 natively only
    into a float32 result (a bf16-result product is upcast to a float32 one, ~3.5x slower)."""
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.result_type(x, w))


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)``; kernel stored [in, out] (the transpose of torch's)."""

    def __init__(self, d_in: int, d_out: int, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = normal_param(rngs, (d_in, d_out), dtype)
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = dot(x, self.kernel[...])
        return y + self.bias[...] if self.bias is not None else y


def attend(q, k, v, bias, scale: float, sinks: jax.Array | None = None, chunk: int = 128) -> jax.Array:
    """Softmax attention, grouped-query. q [B,T,H,D], k [B,T,KV,D], v [B,T,KV,Dv], bias [B,T,T] additive
    and causal (keys after a query masked).

    ``sinks`` [H] (GPT-OSS): a learned per-head logit that joins each softmax and is then dropped.
    One sequence at a time, heads-major, in causal query chunks of ``chunk`` rows that read only the
    keys up to their last query; the softmax is normalised after the value product.
    """
    B, T, H, D = q.shape
    KV = k.shape[2]
    G = H // KV

    def one(args):
        q, k, v, bias = args
        qt = q.reshape(T, KV, G, D).transpose(1, 2, 0, 3)  # [KV, G, T, D]
        kt, vt = k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # [KV, T, *]
        outs = []
        for a in range(0, T, chunk):
            e = min(T, a + chunk)
            s = jnp.einsum("kgtd,ksd->kgts", qt[:, :, a:e], kt[:, :e], preferred_element_type=jnp.float32)
            s = s * scale + bias[None, None, a:e, :e]
            p, den = _softmax_parts(s, sinks, KV, G)
            o = jnp.einsum("kgts,ksd->kgtd", p.astype(v.dtype), vt[:, :e], preferred_element_type=jnp.float32)
            outs.append((o / den).astype(v.dtype))
        return jnp.concatenate(outs, 2).transpose(2, 0, 1, 3).reshape(T, H, -1)

    return jax.lax.map(one, (q, k, v, bias))


def _softmax_parts(s: jax.Array, sinks: jax.Array | None, KV: int, G: int) -> tuple[jax.Array, jax.Array]:
    """Unnormalised softmax weights over the last axis of scores s [..., KV, G, T, S] and their denominator;
    GPT-OSS sinks (one logit per head) join the denominator only."""
    m = s.max(-1, keepdims=True)
    if sinks is not None:
        sk = sinks.reshape(KV, G, 1, 1).astype(jnp.float32)
        m = jnp.maximum(m, sk)
    p = jnp.exp(s - m)
    return p, p.sum(-1, keepdims=True) + (0.0 if sinks is None else jnp.exp(sk - m))


def attend_cached(q, k, v, bias, scale: float, sinks: jax.Array | None = None) -> jax.Array:
    """:func:`attend` for T new queries over a cache of S slots: q [B,T,H,D], k [B,S,KV,D], v [B,S,KV,Dv],
    bias [B,T,S] additive (it masks empty, padding, future and out-of-window slots)."""
    B, T, H, D = q.shape
    KV = k.shape[2]
    G = H // KV
    s = jnp.einsum("btkgd,bskd->bkgts", q.reshape(B, T, KV, G, D), k, preferred_element_type=jnp.float32)
    s = s * scale + bias[:, None, None]
    p, den = _softmax_parts(s, sinks, KV, G)
    o = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (o / den).astype(v.dtype).transpose(0, 3, 1, 2, 4).reshape(B, T, H, -1)


def write_cache(cache: tuple[jax.Array, ...], new: tuple[jax.Array, ...], start) -> tuple[jax.Array, ...]:
    """Each new entry [B, T, ...] written into its cache [B, S, ...] at slots ``start`` .. ``start + T - 1``."""
    return tuple(jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), start, axis=1) for c, n in zip(cache, new))
