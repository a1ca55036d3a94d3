"""Flax NNX decoder-only MoE language model shared by all supported families.

Blocks (RMSNorm, attention, dense MLP, router, MoE block) are written once; families differ
only through :class:`~mone_jax.config.ModelConfig` fields. A pruned MoE block is the same
module with K < E expert rows plus ``novice_values`` for the E - K novices.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from mone_jax.config import ModelConfig
from mone_jax.moe import Experts, ExpertStats, default_impl, dispatch
from mone_jax.rope import apply_rope, rope_tables

MASK_VALUE = -1e30


class Buffer(nnx.Variable):
    """Non-trainable array state (expert id maps)."""


def _init(rngs: nnx.Rngs, shape, dtype, std: float = 0.02) -> nnx.Param:
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
        self.kernel = _init(rngs, (d_in, d_out), dtype)
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x, self.kernel[...])
        return y + self.bias[...] if self.bias is not None else y


class Attention(nnx.Module):
    """Multi-head attention with GQA, optional q/k RMSNorm, qkv clipping and sliding window."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, H, KV, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(d, H * D, cfg.qkv_bias, dtype, rngs)
        self.k_proj = Linear(d, KV * D, cfg.qkv_bias, dtype, rngs)
        self.v_proj = Linear(d, KV * D, cfg.qkv_bias, dtype, rngs)
        self.o_proj = Linear(H * D, d, cfg.o_bias, dtype, rngs)
        norm_dims = {"proj": (H * D, KV * D), "head": (D, D)}.get(cfg.qk_norm)
        self.q_norm = RMSNorm(norm_dims[0], cfg.rms_norm_eps, dtype) if norm_dims else None
        self.k_norm = RMSNorm(norm_dims[1], cfg.rms_norm_eps, dtype) if norm_dims else None
        self.per_head_norm = cfg.qk_norm == "head"
        self.heads, self.kv_heads, self.head_dim = H, KV, D
        self.clip = cfg.clip_qkv
        self.interleave = cfg.rope.interleave

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array) -> jax.Array:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None and not self.per_head_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (jnp.clip(t, -self.clip, self.clip) for t in (q, k, v))
        q = q.reshape(B, T, self.heads, self.head_dim)
        k = k.reshape(B, T, self.kv_heads, self.head_dim)
        v = v.reshape(B, T, self.kv_heads, self.head_dim)
        if self.per_head_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin, self.interleave), apply_rope(k, cos, sin, self.interleave)
        out = attend(q, k, v, bias, self.head_dim**-0.5)
        return self.o_proj(out.reshape(B, T, -1))


def attend(q, k, v, bias, scale: float, sinks: jax.Array | None = None) -> jax.Array:
    """Softmax attention, grouped-query. q [B,T,H,D], k/v [B,S,KV,*], bias [B,T,S] additive."""
    B, T, H, D = q.shape
    KV = k.shape[2]
    qg = q.reshape(B, T, KV, H // KV, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    s = s + bias[:, None, None]
    if sinks is None:
        p = jax.nn.softmax(s, axis=-1)
    else:  # GPT-OSS: a learned per-head logit joins the softmax and is then dropped
        sk = jnp.broadcast_to(sinks.reshape(KV, H // KV)[None, :, :, None, None], (*s.shape[:-1], 1))
        p = jax.nn.softmax(jnp.concatenate([s, sk.astype(s.dtype)], -1), axis=-1)[..., :-1]
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v)
    return out.reshape(B, T, H, v.shape[-1])


class MLP(nnx.Module):
    """SwiGLU MLP (dense layers and shared experts), gate and up fused [d, 2f]."""

    def __init__(self, d: int, f: int, dtype, rngs: nnx.Rngs):
        self.gate_up = _init(rngs, (d, 2 * f), dtype)
        self.down = _init(rngs, (f, d), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.dot(x, self.gate_up[...])
        f = h.shape[-1] // 2
        return jnp.dot(jax.nn.silu(h[..., :f]) * h[..., f:], self.down[...])


def route(logits: jax.Array, cfg: ModelConfig, score_bias: jax.Array | None = None):
    """Top-k expert ids [T, k] and the routing weights [T, k] the forward pass applies."""
    logits = logits.astype(jnp.float32)
    if cfg.scoring == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
    else:
        scores = jax.nn.sigmoid(logits)
    choice = scores if score_bias is None else scores + score_bias.astype(jnp.float32)
    _, ids = jax.lax.top_k(choice, cfg.top_k)
    w = jnp.take_along_axis(scores, ids, axis=-1)
    if cfg.norm_topk_prob:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return ids.astype(jnp.int32), w * cfg.routed_scaling_factor


class MoEBlock(nnx.Module):
    """Router + routed experts (+ shared expert). Pruned: K expert rows plus E - K novice vectors."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, kept: int | None = None):
        d, f, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        K = E if kept is None else kept
        self.cfg = cfg
        self.router = _init(rngs, (d, E), dtype)
        self.gate_up = _init(rngs, (K, d, 2 * f), dtype)
        self.down = _init(rngs, (K, f, d), dtype)
        self.kept_ids = Buffer(jnp.arange(K, dtype=jnp.int32))
        self.novice_ids = Buffer(jnp.zeros((E - K,), jnp.int32))
        self.novice_values = nnx.Param(jnp.zeros((E - K, d), dtype))
        fs = cfg.shared_expert_intermediate_size
        self.shared = MLP(d, fs, dtype, rngs) if fs else None
        self.shared_gate = _init(rngs, (d, 1), dtype) if fs and cfg.shared_expert_gate else None

    @property
    def num_kept(self) -> int:
        return self.gate_up.shape[0]

    def experts(self) -> Experts:
        return Experts(self.gate_up[...], self.down[...])

    def __call__(self, x: jax.Array, stats_mask: jax.Array | None, impl: str, block: int | None):
        B, T, d = x.shape
        xt = x.reshape(B * T, d)
        ids, w = route(jnp.dot(xt, self.router[...]), self.cfg)
        E, K = self.cfg.num_experts, self.num_kept
        # original ids -> compact rows of kept experts; novices go to the skip id K
        if E > K:
            slot = jnp.full((E,), K, jnp.int32).at[self.kept_ids[...]].set(jnp.arange(K, dtype=jnp.int32))
        y, stats = dispatch(
            xt, slot[ids] if E > K else ids, w, self.experts(), impl=impl, block=block,
            stats_mask=None if stats_mask is None else stats_mask.reshape(-1),
        )
        if E > K:
            table = jnp.zeros((E, d), jnp.float32).at[self.novice_ids[...]].set(self.novice_values[...])
            y = y + jnp.einsum("tk,tkd->td", w, table[ids]).astype(y.dtype)
        if self.shared is not None:
            s = self.shared(xt)
            if self.shared_gate is not None:
                s = jax.nn.sigmoid(jnp.dot(xt, self.shared_gate[...])) * s
            y = y + s
        return y.reshape(B, T, d), stats


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype, rngs: nnx.Rngs, kept: int | None = None):
        d = cfg.hidden_size
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, dtype, rngs)
        self.is_moe = cfg.moe_layers[layer]
        self.window = cfg.sliding_windows[layer]
        self.mlp = MoEBlock(cfg, dtype, rngs, kept) if self.is_moe else MLP(d, cfg.intermediate_size, dtype, rngs)

    def __call__(self, x, cos, sin, biases, stats_mask, impl, block):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, biases[self.window])
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            h, stats = self.mlp(h, stats_mask, impl, block)
        else:
            h, stats = self.mlp(h), None
        return x + h, stats


def attention_biases(mask: jax.Array, windows: set[int | None]) -> dict[int | None, jax.Array]:
    """Additive masks [B, T, T] (causal, key padding, optional sliding window) per window size."""
    T = mask.shape[1]
    q = jnp.arange(T)[:, None]
    kv = jnp.arange(T)[None, :]
    out = {}
    for w in windows:
        ok = (kv <= q) if w is None else (kv <= q) & (q - kv < w)
        out[w] = jnp.where(ok[None] & mask[:, None, :].astype(bool), 0.0, MASK_VALUE).astype(jnp.float32)
    return out


class MoEForCausalLM(nnx.Module):
    """The language model. ``model(ids, attention_mask=None)`` -> logits [B, T, vocab] (jitted).

    ``kept`` ({layer: K}) builds MoE layers pruned to K experts plus E - K novices.
    """

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, *, rngs: nnx.Rngs, kept: dict[int, int] | None = None,
                 source_dir: str | None = None):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.impl = default_impl()
        self.block: int | None = None
        self.embed = _init(rngs, (cfg.vocab_size, cfg.hidden_size), dtype)
        kept = kept or {}
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype, rngs, kept.get(i)) for i in range(cfg.num_layers)])
        self.source_dir = source_dir  # the Hugging Face folder the weights came from (for export)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else _init(rngs, (cfg.hidden_size, cfg.vocab_size), dtype)

    def hidden_states(self, ids, mask=None, *, collect: bool = False):
        """Final normed hidden states [B, T, d] and, with ``collect``, {moe layer: ExpertStats}."""
        B, T = ids.shape
        mask = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
        cos, sin = rope_tables(self.config.rope, T, self.dtype)
        biases = attention_biases(mask, {layer.window for layer in self.layers})
        x = self.embed[...][ids]
        stats: dict[int, ExpertStats] = {}
        for i, layer in enumerate(self.layers):
            x, st = layer(x, cos, sin, biases, mask if collect else None, self.impl, self.block)
            if st is not None:
                stats[i] = st
        return self.norm(x), stats

    def logits(self, h: jax.Array) -> jax.Array:
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.dot(h, w, preferred_element_type=jnp.float32)

    def __call__(self, input_ids, attention_mask=None) -> jax.Array:
        ids = jnp.asarray(input_ids, jnp.int32)
        mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)
        graphdef, state = nnx.split(self)
        return _forward(graphdef, state, ids, mask)

    def moe_blocks(self) -> dict[int, MoEBlock]:
        return {i: layer.mlp for i, layer in enumerate(self.layers) if layer.is_moe}


@partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
    model = nnx.merge(graphdef, state)
    h, _ = model.hidden_states(ids, mask)
    return model.logits(h)
