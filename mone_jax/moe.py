"""Dropless MoE dispatch over routed (token, expert) pairs, with fused per-expert statistics.

Three implementations give the same result to fp32 rounding:

- ``scan``  (CPU default): pairs ranked by expert, each expert's group padded to ``block`` rows,
  a ``lax.scan`` over blocks; every block belongs to one expert, so its statistics are computed
  on the block (two-pass, in cache) and Chan-merged into the expert's running moments.
- ``ragged``  (TPU/GPU default): pairs sorted by expert and fed to ``jax.lax.ragged_dot``.
- ``dense``: every expert on every token, then masked; a test oracle only.

Pairs whose expert id equals ``num_experts`` are skipped (used for novices and padding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

IMPLS = ("scan", "ragged", "dense")


class Experts(NamedTuple):
    """A stack of SwiGLU experts: gate_up [E, d, 2f] (gate then up), down [E, f, d], optional biases."""

    gate_up: jax.Array
    down: jax.Array
    gate_up_bias: jax.Array | None = None
    down_bias: jax.Array | None = None


class ExpertStats(NamedTuple):
    """Sufficient statistics of one layer's experts over a batch (float32, count exact)."""

    count: jax.Array  # [E] int32: routed non-padding tokens
    weight_sum: jax.Array  # [E] sum of applied routing weights
    mean: jax.Array  # [E, d] mean raw expert output over routed tokens
    m2: jax.Array  # [E, d] sum of squared deviations from the mean
    reap_sum: jax.Array  # [E] sum over routed tokens of weight * ||raw output||_2


def silu_glu(gate: jax.Array, up: jax.Array) -> jax.Array:
    return jax.nn.silu(gate) * up


def default_impl() -> str:
    return "scan" if jax.default_backend() == "cpu" else "ragged"


def _expert_mlp(x, gate_up, down, glu, b_gu=None, b_d=None):
    h = jnp.dot(x, gate_up, preferred_element_type=jnp.float32)
    if b_gu is not None:
        h = h + b_gu
    f = h.shape[-1] // 2
    a = glu(h[..., :f], h[..., f:]).astype(down.dtype)
    y = jnp.dot(a, down, preferred_element_type=jnp.float32)
    return y + b_d if b_d is not None else y


def _pair_counts(ids: jax.Array, w: jax.Array, valid: jax.Array, n: int):
    onehot = (ids[:, None] == jnp.arange(n)[None, :]) & valid[:, None]
    return onehot.sum(0, dtype=jnp.int32), (onehot * w[:, None]).sum(0)


def _chan_merge(a: tuple, b: tuple) -> tuple:
    """Chan et al. parallel merge of (count, mean, m2) moments; counts as float."""
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    safe = jnp.maximum(n, 1.0)
    delta = mb - ma
    return n, ma + delta * (nb / safe)[..., None], m2a + m2b + delta**2 * (na * nb / safe)[..., None]


def block_size_for(num_pairs: int, num_experts: int, block: int | None) -> int:
    """Rows per block: ``block`` if given, else the power of two near pairs/expert in [8, 128]."""
    if block:
        return block
    per = max(1, num_pairs // max(num_experts, 1))
    return int(min(128, max(8, 1 << (per - 1).bit_length())))


def dispatch(
    x: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
    experts: Experts,
    *,
    impl: str = "scan",
    block: int | None = None,
    stats_mask: jax.Array | None = None,
    glu: Callable = silu_glu,
) -> tuple[jax.Array, ExpertStats | None]:
    """Apply routed experts: ``y[t] = sum_k weights[t,k] * expert_{ids[t,k]}(x[t])``.

    x [T, d]; expert_ids [T, k] int32 in [0, E] (E = skip); weights [T, k]. With ``stats_mask``
    ([T] bool: tokens that count) also returns the batch's :class:`ExpertStats`.
    """
    T, k = expert_ids.shape
    E = experts.gate_up.shape[0]
    ids = expert_ids.reshape(-1).astype(jnp.int32)
    w = weights.reshape(-1).astype(jnp.float32)
    tok = jnp.repeat(jnp.arange(T, dtype=jnp.int32), k)
    fn = {"scan": _scan, "ragged": _ragged, "dense": _dense}[impl]
    valid = None if stats_mask is None else stats_mask[tok] & (ids < E)
    y_pairs, moments = fn(x, ids, w, tok, experts, valid, glu, block)
    y = (y_pairs * w[:, None]).reshape(T, k, -1).sum(1).astype(x.dtype)
    if stats_mask is None:
        return y, None
    count, wsum = _pair_counts(ids, w, valid, E)
    mean, m2, reap = moments
    return y, ExpertStats(count, wsum, mean, m2, reap)


def _scan(x, ids, w, tok, ex: Experts, valid, glu, block):
    P, (T, d) = ids.shape[0], x.shape
    E = ex.gate_up.shape[0]
    B = block_size_for(P, E, block)
    onehot = (ids[:, None] == jnp.arange(E)[None, :]).astype(jnp.int32)  # [P, E]; skip pairs all-zero
    counts = onehot.sum(0)
    rank = (jnp.cumsum(onehot, 0) * onehot).sum(1) - 1
    nblk = (counts + B - 1) // B
    blk_end = jnp.cumsum(nblk)
    n_blocks = -(-P // B) + E  # static bound on sum(ceil(count / B))
    trash = n_blocks * B
    row = jnp.where(ids < E, (blk_end - nblk)[jnp.minimum(ids, E - 1)] * B + rank, trash)
    row_tok = jnp.full((trash + 1,), T, jnp.int32).at[row].set(tok)[:trash]
    x_pad = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])
    block_e = jnp.minimum(jnp.searchsorted(blk_end, jnp.arange(n_blocks), side="right"), E - 1)
    collect = valid is not None
    if collect:
        row_valid = jnp.zeros((trash + 1,), jnp.float32).at[row].set(valid.astype(jnp.float32))[:trash]
        row_w = jnp.zeros((trash + 1,), jnp.float32).at[row].set(w)[:trash]
    bias = ex.gate_up_bias is not None

    def compute(b):
        e = block_e[b]
        xb = x_pad[jax.lax.dynamic_slice_in_dim(row_tok, b * B, B)]
        return _expert_mlp(
            xb, ex.gate_up[e], ex.down[e], glu,
            ex.gate_up_bias[e] if bias else None, ex.down_bias[e] if ex.down_bias is not None else None,
        )

    def body(carry, b):
        yb = jax.lax.cond(b < blk_end[-1], compute, lambda _: jnp.zeros((B, d), jnp.float32), b)
        if not collect:
            return carry, yb
        cnt, mean, m2, reap = carry
        e = block_e[b]
        m = jax.lax.dynamic_slice_in_dim(row_valid, b * B, B)
        nb = m.sum()
        mb = (yb * m[:, None]).sum(0) / jnp.maximum(nb, 1.0)
        dev = (yb - mb) * m[:, None]
        n, mu, q = _chan_merge((cnt[e], mean[e], m2[e]), (nb, mb, (dev * dev).sum(0)))
        r = (m * jax.lax.dynamic_slice_in_dim(row_w, b * B, B) * jnp.linalg.norm(yb, axis=-1)).sum()
        return (cnt.at[e].set(n), mean.at[e].set(mu), m2.at[e].set(q), reap.at[e].add(r)), yb

    zeros = (jnp.zeros((E,)), jnp.zeros((E, d)), jnp.zeros((E, d)), jnp.zeros((E,)))
    carry, ys = jax.lax.scan(body, zeros if collect else (), jnp.arange(n_blocks))
    out = jnp.concatenate([ys.reshape(trash, d), jnp.zeros((1, d), jnp.float32)])
    y_pairs = out[row]
    return y_pairs, (carry[1:] if collect else None)


def _segment_moments(y, seg, valid, w, E):
    """Two-pass per-expert mean / M2 / REAP sum over rows ``y`` with expert ``seg``."""
    m = valid.astype(jnp.float32)
    n = jax.ops.segment_sum(m, seg, E + 1)[:E]
    mean = jax.ops.segment_sum(y * m[:, None], seg, E + 1)[:E] / jnp.maximum(n, 1.0)[:, None]
    dev = (y - mean[jnp.minimum(seg, E - 1)]) * m[:, None]
    m2 = jax.ops.segment_sum(dev * dev, seg, E + 1)[:E]
    reap = jax.ops.segment_sum(m * w * jnp.linalg.norm(y, axis=-1), seg, E + 1)[:E]
    return mean, m2, reap


def _ragged(x, ids, w, tok, ex: Experts, valid, glu, block):
    E = ex.gate_up.shape[0]
    order = jnp.argsort(ids, stable=True)
    sid = ids[order]
    sizes = jnp.bincount(ids, length=E + 1)[:E].astype(jnp.int32)
    xs = x[tok[order]]
    h = jax.lax.ragged_dot(xs, ex.gate_up, sizes, preferred_element_type=jnp.float32)
    e_c = jnp.minimum(sid, E - 1)
    if ex.gate_up_bias is not None:
        h = h + ex.gate_up_bias[e_c]
    f = h.shape[-1] // 2
    a = glu(h[:, :f], h[:, f:]).astype(ex.down.dtype)
    y = jax.lax.ragged_dot(a, ex.down, sizes, preferred_element_type=jnp.float32)
    if ex.down_bias is not None:
        y = y + ex.down_bias[e_c]
    y = jnp.where((sid < E)[:, None], y, 0.0)
    y_pairs = jnp.zeros_like(y).at[order].set(y)
    if valid is None:
        return y_pairs, None
    return y_pairs, _segment_moments(y, sid, valid[order], w[order], E)


def _dense(x, ids, w, tok, ex: Experts, valid, glu, block):
    E = ex.gate_up.shape[0]
    y_all = jax.vmap(
        lambda gu, dn, bgu, bd: _expert_mlp(x, gu, dn, glu, bgu, bd),
        in_axes=(0, 0, 0 if ex.gate_up_bias is not None else None, 0 if ex.down_bias is not None else None),
    )(ex.gate_up, ex.down, ex.gate_up_bias, ex.down_bias)  # [E, T, d]
    y_pairs = jnp.where((ids < E)[:, None], y_all[jnp.minimum(ids, E - 1), tok], 0.0)
    if valid is None:
        return y_pairs, None
    return y_pairs, _segment_moments(y_pairs, ids, valid, w, E)
