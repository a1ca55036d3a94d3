"""Gated DeltaNet: the linear-attention token mixer of Qwen3-Next / Qwen3.5 hybrid layers.

The gated delta rule (Yang, Kautz and Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta
Rule", ICLR 2025) keeps a state ``S`` [Dk, Dv] per head and, for each token, decays it, corrects what it
predicts for the key and reads it with the query::

    S <- exp(g_t) S;   S <- S + beta_t k_t (v_t - S^T k_t)^T;   o_t = S^T q_t

:func:`chunked_gated_delta_rule` computes this exactly in chunks: within a chunk the corrections are one
unit-lower-triangular solve (the UT / WY form of the delta rule), and a ``lax.scan`` carries ``S`` from
chunk to chunk. :class:`GatedDeltaNet` is the whole mixer: input projections, a causal depthwise
convolution with SiLU, L2-normalised queries and keys, the recurrence and an RMS norm gated by SiLU(z).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mone_jax.base.config import ModelConfig
from mone_jax.model.layers import Linear, RMSNorm, normal_param

_HI = jax.lax.Precision.HIGHEST  # the recurrence runs in float32, as transformers' torch path does


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``x / sqrt(|x|^2 + eps)`` over the last axis (the FLA library's convention)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def causal_depthwise_conv(x: jax.Array, weight: jax.Array, state: jax.Array | None = None):
    """Per-channel causal convolution. x [B, T, C], weight [C, K] (tap K-1 multiplies the current token),
    state [B, K-1, C]: the inputs before x (zeros when None). Returns (y [B, T, C], the new state)."""
    B, T, C = x.shape
    K = weight.shape[-1]
    prev = jnp.zeros((B, K - 1, C), x.dtype) if state is None else state.astype(x.dtype)
    xp = jnp.concatenate([prev, x], axis=1)  # [B, T + K - 1, C]
    y = sum(xp[:, j:j + T].astype(jnp.float32) * weight[:, j].astype(jnp.float32) for j in range(K))
    return y, xp[:, T:]


def chunked_gated_delta_rule(q, k, v, g, beta, state=None, chunk: int = 64):
    """The gated delta rule over a sequence, in chunks of ``chunk`` tokens (exact, float32).

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; g (log decay, <= 0) and beta [B, T, H]; state [B, H, Dk, Dv]
    or None (zeros). Returns (o [B, T, H, Dv], final state [B, H, Dk, Dv]).

    Within a chunk with cumulative log decays ``c_i``, token i's correction ``u_i`` depends on the
    corrections before it through ``A_ij = beta_i k_i.k_j exp(c_i - c_j)`` (j < i); solving
    ``(I + A) [U, W] = [beta v, beta k exp(c)]`` gives the corrections of a zero state (U) and how the
    chunk's incoming state changes them (W), so a chunk costs a few matmuls and one carried state.
    """
    f32 = jnp.float32
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    C = max(1, min(chunk, T))
    pad = -T % C
    N = (T + pad) // C

    def chunks(x):  # [B, T, H, ...] -> [N, B, H, C, ...]; padded tokens: k = v = g = beta = 0 (no effect)
        x = jnp.pad(x.astype(f32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(B, N, C, H, *x.shape[3:])
        return jnp.moveaxis(x, (1, 3), (0, 2))

    q, k, v, g, beta = (chunks(a) for a in (q, k, v, g, beta))
    c = jnp.cumsum(g, axis=-1)  # [N, B, H, C]
    lower = jnp.tril(jnp.ones((C, C), bool))
    gap = c[..., :, None] - c[..., None, :]
    decay = jnp.where(lower, jnp.exp(jnp.where(lower, gap, 0.0)), 0.0)  # exp(c_i - c_j), j <= i
    kb = k * beta[..., None]
    a = jnp.einsum("...id,...jd->...ij", kb, k, precision=_HI) * decay
    system = jnp.eye(C, dtype=f32) + jnp.tril(a, -1)
    rhs = jnp.concatenate([v * beta[..., None], kb * jnp.exp(c)[..., None]], axis=-1)
    sol = jax.scipy.linalg.solve_triangular(system, rhs, lower=True, unit_diagonal=True)
    u, w = sol[..., :Dv], sol[..., Dv:]  # corrections of a zero state; their change per unit of state
    intra = jnp.einsum("...id,...jd->...ij", q, k, precision=_HI) * decay
    q_in = q * jnp.exp(c)[..., None]  # reads the incoming state, decayed to each token
    k_out = k * jnp.exp(c[..., -1:] - c)[..., None]  # writes decayed to the chunk's end
    chunk_decay = jnp.exp(c[..., -1])[..., None, None]

    def step(s, xs):
        u, w, q_in, intra, k_out, cd = xs
        v_new = u - jnp.einsum("...ik,...kv->...iv", w, s, precision=_HI)
        o = jnp.einsum("...ik,...kv->...iv", q_in, s, precision=_HI) + \
            jnp.einsum("...ij,...jv->...iv", intra, v_new, precision=_HI)
        s = s * cd + jnp.einsum("...ik,...iv->...kv", k_out, v_new, precision=_HI)
        return s, o

    s0 = jnp.zeros((B, H, Dk, Dv), f32) if state is None else state.astype(f32)
    s, o = jax.lax.scan(step, s0, (u, w, q_in, intra, k_out, chunk_decay))
    o = jnp.moveaxis(o, (0, 2), (1, 3)).reshape(B, N * C, H, Dv)[:, :T]
    return o, s


class DepthwiseConv(nnx.Module):
    """Weight of a depthwise ``nn.Conv1d`` kept in torch's layout [C, 1, K]."""

    def __init__(self, channels: int, kernel: int, dtype, rngs: nnx.Rngs):
        self.weight = normal_param(rngs, (channels, 1, kernel), dtype, std=0.3)


class GatedDeltaNet(nnx.Module):
    """Qwen3-Next / Qwen3.5 linear attention (transformers' ``linear_attn``), parameter names as on disk.

    Projections: Qwen3-Next's ``in_proj_qkvz`` / ``in_proj_ba`` (columns grouped per key head), or
    Qwen3.5's ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``. Padding tokens (from the causal
    attention bias) are zeroed before the projections, so they never reach the state.
    """

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        dn = cfg.deltanet
        d = cfg.hidden_size
        self.dn, self.eps = dn, cfg.rms_norm_eps
        key_dim, value_dim = dn.key_heads * dn.key_dim, dn.value_heads * dn.value_dim
        if dn.fused_proj:
            self.in_proj_qkvz = Linear(d, 2 * key_dim + 2 * value_dim, False, dtype, rngs)
            self.in_proj_ba = Linear(d, 2 * dn.value_heads, False, dtype, rngs)
        else:
            self.in_proj_qkv = Linear(d, 2 * key_dim + value_dim, False, dtype, rngs)
            self.in_proj_z = Linear(d, value_dim, False, dtype, rngs)
            self.in_proj_b = Linear(d, dn.value_heads, False, dtype, rngs)
            self.in_proj_a = Linear(d, dn.value_heads, False, dtype, rngs)
        self.conv1d = DepthwiseConv(2 * key_dim + value_dim, dn.conv_kernel, dtype, rngs)
        self.dt_bias = nnx.Param(jnp.ones((dn.value_heads,), dtype))
        self.A_log = nnx.Param(jnp.zeros((dn.value_heads,), dtype))
        self.norm = RMSNorm(dn.value_dim, cfg.rms_norm_eps, dtype)
        self.out_proj = Linear(value_dim, d, False, dtype, rngs)

    def _project(self, x: jax.Array):
        """(qkv [B, T, 2 Hk Dk + Hv Dv] (q heads, k heads, v heads), z [B, T, Hv, Dv], b, a [B, T, Hv])."""
        dn = self.dn
        B, T, _ = x.shape
        if not dn.fused_proj:
            z = self.in_proj_z(x).reshape(B, T, dn.value_heads, dn.value_dim)
            return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)
        r = dn.value_heads // dn.key_heads  # value heads per key head
        qkvz = self.in_proj_qkvz(x).reshape(B, T, dn.key_heads, -1)
        q, k, v, z = jnp.split(qkvz, [dn.key_dim, 2 * dn.key_dim, 2 * dn.key_dim + r * dn.value_dim], axis=-1)
        b, a = jnp.split(self.in_proj_ba(x).reshape(B, T, dn.key_heads, 2 * r), 2, axis=-1)
        qkv = jnp.concatenate([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], axis=-1)
        return qkv, z.reshape(B, T, dn.value_heads, dn.value_dim), b.reshape(B, T, -1), a.reshape(B, T, -1)

    def __call__(self, x: jax.Array, cos=None, sin=None, bias: jax.Array | None = None) -> jax.Array:
        """x [B, T, d] -> [B, T, d]; ``bias`` [B, T, T]: the causal attention bias (its padding is zeroed)."""
        return self._mix(x, bias, None)[0]

    def init_cache(self, batch: int, slots: int, dtype) -> tuple[jax.Array, jax.Array]:
        """The decoding state, whatever the number of ``slots``: the last K - 1 convolution inputs [B, K-1, C]
        and the recurrent state [B, Hv, Dk, Dv] (float32)."""
        dn = self.dn
        channels = 2 * dn.key_heads * dn.key_dim + dn.value_heads * dn.value_dim
        return (jnp.zeros((batch, dn.conv_kernel - 1, channels), dtype),
                jnp.zeros((batch, dn.value_heads, dn.key_dim, dn.value_dim), jnp.float32))

    def cached(self, x, cos, sin, bias, cache, start, prefill: bool):
        """New tokens x [B, T, d] continuing from the state ``cache``: the prompt (``prefill``, its padding
        zeroed as in the forward) or generated tokens (never padding); returns (output, new state)."""
        return self._mix(x, bias if prefill else None, cache)

    def _mix(self, x: jax.Array, bias: jax.Array | None, cache: tuple[jax.Array, jax.Array] | None):
        dn, dtype = self.dn, x.dtype
        B, T, _ = x.shape
        if bias is not None:  # the last query row of the causal bias masks exactly the padding keys
            x = x * (bias[:, -1, -T:] == 0)[..., None].astype(dtype)
        qkv, z, b, a = self._project(x)
        conv, conv_state = causal_depthwise_conv(qkv, self.conv1d.weight[...][:, 0, :],
                                                 None if cache is None else cache[0])
        qkv = jax.nn.silu(conv).astype(dtype)
        kd = dn.key_heads * dn.key_dim
        q = qkv[..., :kd].reshape(B, T, dn.key_heads, dn.key_dim)
        k = qkv[..., kd:2 * kd].reshape(B, T, dn.key_heads, dn.key_dim)
        v = qkv[..., 2 * kd:].reshape(B, T, dn.value_heads, dn.value_dim)
        beta = jax.nn.sigmoid(b).astype(jnp.float32)
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
            a.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        r = dn.value_heads // dn.key_heads
        q, k = (jnp.repeat(l2_normalize(t.astype(jnp.float32)), r, axis=2) for t in (q, k))
        o, state = chunked_gated_delta_rule(q * dn.key_dim**-0.5, k, v, g, beta,
                                            None if cache is None else cache[1], chunk=dn.chunk)
        o = self.norm(o.astype(dtype)) * jax.nn.silu(z.astype(jnp.float32))
        return self.out_proj(o.astype(dtype).reshape(B, T, -1)), (conv_state, state)
