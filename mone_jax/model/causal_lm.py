"""Flax NNX decoder-only MoE language model shared by all supported families.

Blocks (RMSNorm, attention, dense MLP, router, MoE block) are written once; families differ
only through :class:`~mone_jax.base.config.ModelConfig` fields. A pruned MoE block is the same
module with K < E expert rows plus ``novice_values`` for the E - K novices.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from mone_jax.base.config import ModelConfig
from mone_jax.base.stats import LayerStats
from mone_jax.model.deltanet import GatedDeltaNet
from mone_jax.model.layers import (
    Buffer,
    ExpertBuffer,
    ExpertParam,
    LayerNorm,
    Linear,
    RMSNorm,
    attend,
    attend_cached,
    dot,
    normal_param,
    write_cache,
)
from mone_jax.model.mla import MLAttention
from mone_jax.model.moe import EXPERT, Experts, default_impl, dispatch, expert_parallel_dispatch, silu_glu
from mone_jax.model.rope import apply_rope, rope_tables
from mone_jax.model.sparsemixer import sparsemixer_top2

MASK_VALUE = -1e30
# a decoder layer's norms as transformers names them (each may be None: post-norm layers have no input norm)
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "post_feedforward_layernorm")


class Attention(nnx.Module):
    """Multi-head attention with GQA, optional q/k RMSNorm, qkv clipping, sliding window and output gate
    (Qwen3-Next: q_proj gives [query | gate] per head, the output is scaled by sigmoid(gate))."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, H, KV, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.gated = cfg.attn_output_gate
        self.q_proj = Linear(d, H * D * (2 if self.gated else 1), cfg.qkv_bias, dtype, rngs)
        self.k_proj = Linear(d, KV * D, cfg.qkv_bias, dtype, rngs)
        self.v_proj = Linear(d, KV * D, cfg.qkv_bias, dtype, rngs)
        self.o_proj = Linear(H * D, d, cfg.o_bias, dtype, rngs)
        norm_dims = {"proj": (H * D, KV * D), "head": (D, D)}.get(cfg.qk_norm)
        unit = cfg.rms_norm_unit_offset
        self.q_norm = RMSNorm(norm_dims[0], cfg.rms_norm_eps, dtype, unit) if norm_dims else None
        self.k_norm = RMSNorm(norm_dims[1], cfg.rms_norm_eps, dtype, unit) if norm_dims else None
        self.per_head_norm = cfg.qk_norm == "head"
        self.norm_after_rope = cfg.qk_norm_after_rope
        self.heads, self.kv_heads, self.head_dim = H, KV, D
        self.clip = cfg.clip_qkv
        self.interleave = cfg.rope.interleave
        self.sinks = nnx.Param(jnp.zeros((H,), dtype)) if cfg.attention_sinks else None

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array) -> jax.Array:
        q, k, v, gate = self.qkv(x, cos, sin)
        sinks = None if self.sinks is None else self.sinks[...]
        return self.output(attend(q, k, v, bias, self.head_dim**-0.5, sinks), gate)

    def init_cache(self, batch: int, slots: int, dtype) -> tuple[jax.Array, jax.Array]:
        """An empty KV cache: keys and values [B, S, KV, D] (after norm, clipping and RoPE)."""
        return (jnp.zeros((batch, slots, self.kv_heads, self.head_dim), dtype),) * 2

    def cached(self, x, cos, sin, bias, cache, start, prefill: bool):
        """Attention of new tokens x [B, T, d] written into ``cache`` at slot ``start``: ``prefill`` (start 0)
        attends among them as the forward does (bias [B, T, T]), else over the cache (bias [B, T, S])."""
        q, k, v, gate = self.qkv(x, cos, sin)
        cache = write_cache(cache, (k, v), start)
        sinks = None if self.sinks is None else self.sinks[...]
        if prefill:
            out = attend(q, k, v, bias, self.head_dim**-0.5, sinks)
        else:
            out = attend_cached(q, *cache, bias, self.head_dim**-0.5, sinks)
        return self.output(out, gate), cache

    def output(self, out: jax.Array, gate: jax.Array | None) -> jax.Array:
        """o_proj of the heads' outputs [B, T, H, D], gated per channel by sigmoid(gate) when there is one."""
        out = out.reshape(*out.shape[:2], -1)
        return self.o_proj(out if gate is None else out * jax.nn.sigmoid(gate.reshape(out.shape)))

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """Queries [B, T, H, D], keys and values [B, T, KV, D], normed, clipped and rotated; the output gate
        [B, T, H, D] or None."""
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        gate = None
        if self.gated:
            q, gate = jnp.split(q.reshape(B, T, self.heads, 2 * self.head_dim), 2, axis=-1)
            q = q.reshape(B, T, -1)
        if self.q_norm is not None and not self.per_head_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (jnp.clip(t, -self.clip, self.clip) for t in (q, k, v))
        q = q.reshape(B, T, self.heads, self.head_dim)
        k = k.reshape(B, T, self.kv_heads, self.head_dim)
        v = v.reshape(B, T, self.kv_heads, self.head_dim)
        if self.per_head_norm and not self.norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin, self.interleave), apply_rope(k, cos, sin, self.interleave)
        if self.norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v, gate


class MLP(nnx.Module):
    """SwiGLU MLP (dense layers and shared experts), gate and up fused [d, 2f]."""

    def __init__(self, d: int, f: int, dtype, rngs: nnx.Rngs):
        self.gate_up = normal_param(rngs, (d, 2 * f), dtype)
        self.down = normal_param(rngs, (f, d), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = dot(x, self.gate_up[...])
        f = h.shape[-1] // 2
        return dot(jax.nn.silu(h[..., :f]) * h[..., f:], self.down[...])


def route(logits: jax.Array, cfg: ModelConfig, score_bias: jax.Array | None = None):
    """Top-k expert ids [T, k] and the routing weights [T, k] the forward pass applies.

    Scores are softmax or sigmoid of the logits (Phi-MoE's SparseMixer instead:
    :func:`~mone_jax.model.sparsemixer.sparsemixer_top2`); ``score_bias`` (DeepSeek-V3 / GLM) shifts them for
    the choice only. Group-limited selection (``topk_group < n_group``) first keeps the
    ``topk_group`` groups with the best group score (max, or sum of the top 2) and picks the
    top-k among their experts. Weights are the unbiased scores of the chosen experts, optionally
    renormalised, times ``routed_scaling_factor``.
    """
    logits = logits.astype(jnp.float32)
    if cfg.scoring == "sparsemixer":
        return sparsemixer_top2(logits, cfg.sparsemixer_eps)
    scores = jax.nn.softmax(logits, axis=-1) if cfg.scoring == "softmax" else jax.nn.sigmoid(logits)
    choice = scores if score_bias is None else scores + score_bias.astype(jnp.float32)
    if cfg.topk_group < cfg.n_group:
        T, E = choice.shape
        grouped = choice.reshape(T, cfg.n_group, E // cfg.n_group)
        group = grouped.max(-1) if cfg.group_score == "max" else jax.lax.top_k(grouped, 2)[0].sum(-1)
        _, keep = jax.lax.top_k(group, cfg.topk_group)
        mask = jnp.zeros((T, cfg.n_group), bool).at[jnp.arange(T)[:, None], keep].set(True)
        choice = jnp.where(jnp.repeat(mask, E // cfg.n_group, axis=1), choice, -jnp.inf)
    _, ids = jax.lax.top_k(choice, cfg.top_k)
    w = jnp.take_along_axis(scores, ids, axis=-1)
    if cfg.norm_topk_prob:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return ids.astype(jnp.int32), w * cfg.routed_scaling_factor


def clamped_swiglu(gate: jax.Array, up: jax.Array, alpha: float, limit: float) -> jax.Array:
    """GPT-OSS expert activation: clamped gate and up, ``gate * sigmoid(alpha * gate) * (up + 1)``."""
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return gate * jax.nn.sigmoid(gate * alpha) * (up + 1)


class MoEBlock(nnx.Module):
    """Router + routed experts (+ shared expert). Pruned: K expert rows plus E - K novice vectors.

    Per-expert arrays (:class:`~mone_jax.model.layers.ExpertParam` ``gate_up``, ``down`` and, with
    ``expert_bias``, ``gate_up_bias``, ``down_bias``; the ``kept_ids`` buffer) have K rows, or more on
    a mesh whose expert axis does not divide K: inert padding rows that no token reaches.
    Router-side arrays (``router``, ``router_bias``, ``score_bias``) have E columns / entries.

    Inside a ``shard_map`` over a (data, expert) mesh the experts run expert-parallel
    (:func:`~mone_jax.model.moe.expert_parallel_dispatch`); with a ``stats_mask`` the block sows its
    :class:`~mone_jax.base.stats.LayerStats` into ``nnx.Intermediate`` (see :func:`capture_sown`); with
    ``sow_router`` set (before tracing: training a model), it also sows its router logits [T, E].
    """

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, kept: int | None = None):
        d, f, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        K = E if kept is None else kept
        self.cfg = cfg
        self.router = normal_param(rngs, (d, E), jnp.float32 if cfg.router_fp32 else dtype)
        self.router_bias = nnx.Param(jnp.zeros((E,), dtype)) if cfg.router_bias else None
        self.score_bias = Buffer(jnp.zeros((E,), jnp.float32)) if cfg.score_bias else None
        self.num_kept = K
        self.gate_up = normal_param(rngs, (K, 2 * f, d), dtype, kind=ExpertParam)  # [out, in], as stored
        self.down = normal_param(rngs, (K, d, f), dtype, kind=ExpertParam)
        self.gate_up_bias = ExpertParam(jnp.zeros((K, 2 * f), dtype)) if cfg.expert_bias else None
        self.down_bias = ExpertParam(jnp.zeros((K, d), dtype)) if cfg.expert_bias else None
        self.kept_ids = ExpertBuffer(jnp.arange(K, dtype=jnp.int32))
        self.novice_ids = Buffer(jnp.zeros((E - K,), jnp.int32))
        self.novice_values = nnx.Param(jnp.zeros((E - K, d), dtype))
        fs = cfg.shared_expert_intermediate_size
        self.shared = MLP(d, fs, dtype, rngs) if fs else None
        self.shared_gate = normal_param(rngs, (d, 1), dtype) if fs and cfg.shared_expert_gate else None
        self.sow_router = False
        self.novice_mask = nnx.data(None)  # searchable (set_novice_mask): Buffer [E] bool, the experts as novices
        self.novice_table = nnx.data(None)  # and Buffer [E, d] float32, every expert's novice vector

    def set_novice_mask(self, table: jax.Array, mask: jax.Array) -> None:
        """Make an unpruned block searchable: the experts of ``mask`` [E] bool act as their novice vectors
        ``table`` [E, d], as a substitution plan would make them, while every expert keeps its weights, so
        that any subset gives arrays of the same shapes (one compiled program for a whole search)."""
        if self.num_kept != self.cfg.num_experts:
            raise ValueError("only an unpruned block can be searched")
        self.novice_table = Buffer(jnp.asarray(table, jnp.float32))
        self.novice_mask = Buffer(jnp.asarray(mask, bool))

    def clear_novice_mask(self) -> None:
        """Back to an ordinary block (:meth:`set_novice_mask` undone)."""
        self.novice_mask = self.novice_table = None

    def experts(self) -> Experts:
        if self.gate_up_bias is None:
            return Experts(self.gate_up[...], self.down[...])
        return Experts(self.gate_up[...], self.down[...], self.gate_up_bias[...], self.down_bias[...])

    def glu(self):
        """The experts' activation ``glu(gate, up)``."""
        if self.cfg.glu == "clamped_swiglu":
            return partial(clamped_swiglu, alpha=self.cfg.swiglu_alpha, limit=self.cfg.swiglu_limit)
        return silu_glu

    def route(self, xt: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Expert ids [T, k] (original numbering) and applied routing weights [T, k] of tokens xt [T, d]."""
        if self.cfg.router_fp32:
            logits = jnp.dot(xt.astype(jnp.float32), self.router[...].astype(jnp.float32))
        else:
            logits = jnp.dot(xt, self.router[...])
        if self.router_bias is not None:
            logits = logits + self.router_bias[...]
        if self.sow_router:
            self.sow(nnx.Intermediate, "router_logits", logits)
        return route(logits, self.cfg, None if self.score_bias is None else self.score_bias[...])

    def __call__(self, x: jax.Array, stats_mask: jax.Array | None, impl: str, block: int | None) -> jax.Array:
        B, T, d = x.shape
        xt = x.reshape(B * T, d)
        ids, w = self.route(xt)
        E, K, rows = self.cfg.num_experts, self.num_kept, self.gate_up.shape[0]
        # original ids -> compact rows of kept experts; novices go to the skip id (the row count)
        if E > K:
            slot = jnp.full((E,), rows, jnp.int32).at[self.kept_ids[:K]].set(jnp.arange(K, dtype=jnp.int32))
        elif self.novice_mask is not None:  # searchable: masked experts go to the skip id, their novices below
            slot = jnp.where(self.novice_mask[...], rows, jnp.arange(E, dtype=jnp.int32))
        mesh = jax.sharding.get_abstract_mesh()
        parallel = EXPERT in mesh.manual_axes  # inside the calibration steps' shard_map
        fn = partial(expert_parallel_dispatch, mesh=mesh) if parallel else dispatch
        mapped = E > K or self.novice_mask is not None
        y, stats = fn(xt, slot[ids] if mapped else ids, w, self.experts(), impl=impl, block=block,
                      stats_mask=None if stats_mask is None else stats_mask.reshape(-1), glu=self.glu())
        if stats is not None:  # local expert rows under shard_map; else padding rows dropped here
            self.sow(nnx.Intermediate, "stats", stats if parallel else LayerStats(*(a[:K] for a in stats)))
        if E > K or self.novice_mask is not None:  # novices: weights scattered to [T, E] times the novice vectors
            if E > K:  # (zero rows for kept experts)
                table = jnp.zeros((E, d), jnp.float32).at[self.novice_ids[...]].set(self.novice_values[...])
            else:
                table = jnp.where(self.novice_mask[...][:, None], self.novice_table[...], 0.0)
            dense_w = jnp.zeros((B * T, E), jnp.float32).at[jnp.arange(B * T)[:, None], ids].add(w)
            y = y + jnp.dot(dense_w, table).astype(y.dtype)
        if self.shared is not None:
            s = self.shared(xt)
            if self.shared_gate is not None:
                s = jax.nn.sigmoid(jnp.dot(xt, self.shared_gate[...])) * s
            y = y + s
        return y.reshape(B, T, d)


def decoder_norm(cfg: ModelConfig, dtype) -> RMSNorm | LayerNorm:
    """A decoder layer's or the final norm: RMSNorm, or LayerNorm with bias (``cfg.layer_norm``)."""
    if cfg.layer_norm:
        return LayerNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, cfg.rms_norm_unit_offset)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype, rngs: nnx.Rngs, kept: int | None = None):
        d = cfg.hidden_size
        self.input_layernorm = None if cfg.post_norm else decoder_norm(cfg, dtype)
        self.post_attention_layernorm = decoder_norm(cfg, dtype)
        self.post_feedforward_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype) if cfg.post_norm else None
        self.post_norm = cfg.post_norm
        self.linear = bool(cfg.linear_layers) and cfg.linear_layers[layer]  # token mixer: Gated DeltaNet
        if self.linear:
            self.linear_attn = GatedDeltaNet(cfg, dtype, rngs)
        else:
            self.self_attn = MLAttention(cfg, dtype, rngs) if cfg.mla else Attention(cfg, dtype, rngs)
        self.is_moe = cfg.moe_layers[layer]
        self.window = cfg.sliding_windows[layer]
        self.mlp = MoEBlock(cfg, dtype, rngs, kept) if self.is_moe else MLP(d, cfg.intermediate_size, dtype, rngs)

    @property
    def mixer_name(self) -> str:
        """The token mixer's attribute (and transformers module) name: ``self_attn`` or ``linear_attn``."""
        return "linear_attn" if self.linear else "self_attn"

    @property
    def mixer(self) -> nnx.Module:
        """The token mixer: attention, or a Gated DeltaNet."""
        return getattr(self, self.mixer_name)

    def __call__(self, x, cos, sin, biases, stats_mask, impl, block):
        x = x + self._out(0, self.mixer(self._in(0, x), cos, sin, biases[self.window]))
        h = self._in(1, x)
        return x + self._out(1, self.mlp(h, stats_mask, impl, block) if self.is_moe else self.mlp(h))

    def cached(self, x, cos, sin, bias, cache, start, prefill: bool, impl, block):
        """The layer on new tokens with a KV cache (see ``Attention.cached``; a DeltaNet's cache is its
        recurrent and convolution state); no statistics."""
        a, cache = self.mixer.cached(self._in(0, x), cos, sin, bias, cache, start, prefill)
        x = x + self._out(0, a)
        h = self._in(1, x)
        return x + self._out(1, self.mlp(h, None, impl, block) if self.is_moe else self.mlp(h)), cache

    def _in(self, i: int, x: jax.Array) -> jax.Array:
        """Input of sublayer i (0 attention, 1 MLP): normed in pre-norm layers."""
        return x if self.post_norm else (self.input_layernorm, self.post_attention_layernorm)[i](x)

    def _out(self, i: int, y: jax.Array) -> jax.Array:
        """Output of sublayer i: normed in post-norm layers (OLMo2 / FlexOlmo)."""
        return (self.post_attention_layernorm, self.post_feedforward_layernorm)[i](y) if self.post_norm else y


def capture_sown(fn, *args, name: str = "stats") -> tuple:
    """``fn(*args)`` (a module or bound method) and the values named ``name`` that its MoE blocks sowed,
    keyed by block path."""
    out, sown = nnx.capture(fn, nnx.Intermediate)(*args)
    return out, {path[:-1]: var.get_value()[0] for path, var in nnx.to_flat_state(sown) if path[-1] == name}


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

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, *, rngs: nnx.Rngs, kept: dict[int, int] | None = None):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.impl = default_impl()
        self.block: int | None = None
        self.embed = normal_param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype)
        kept = kept or {}
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype, rngs, kept.get(i)) for i in range(cfg.num_layers)])
        self.norm = decoder_norm(cfg, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else normal_param(rngs, (cfg.hidden_size, cfg.vocab_size), dtype)
        self.lm_head_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), dtype)) if cfg.lm_head_bias else None

    def hidden_states(self, ids, mask=None, *, collect: bool = False):
        """Final normed hidden states [B, T, d] and, with ``collect``, {moe layer: LayerStats}."""
        B, T = ids.shape
        mask = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
        cos, sin = rope_tables(self.config.rope, T, self.dtype)
        biases = attention_biases(mask, {layer.window for layer in self.layers})
        x = self.embed[...][ids]
        if not collect:
            return self.norm(self._decode(x, cos, sin, biases, None)), {}
        x, stats = capture_sown(self._decode, x, cos, sin, biases, mask)
        return self.norm(x), {path[1]: s for path, s in stats.items()}  # path: layers, i, mlp

    def _decode(self, x, cos, sin, biases, stats_mask):
        for layer in self.layers:
            x = layer(x, cos, sin, biases, stats_mask, self.impl, self.block)
        return x

    def logits(self, h: jax.Array) -> jax.Array:
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        out = jnp.dot(h, w, preferred_element_type=jnp.float32)
        return out if self.lm_head_bias is None else out + self.lm_head_bias[...].astype(jnp.float32)

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
