"""Dropless MoE dispatch over routed (token, expert) pairs, with fused per-expert statistics.

Three implementations give the same result to fp32 rounding:

- ``scan``  (CPU default): pairs ranked by expert (a one-hot cumulative sum), then a ``lax.scan``
  whose every step runs up to ``block`` rows of one expert (a chunk size in multiples of block/8,
  so padding stays under block/8 rows per expert and each expert's weights are read once per
  ``block`` rows), scatter-adds the weighted rows into the output and Chan-merges the step's
  two-pass moments into the expert's running ones: statistics are fused with the dispatch. With
  statistics (never differentiated) the loop runs exactly the steps the counts need.
- ``ragged``  (TPU/GPU default): pairs sorted by expert and fed to ``jax.lax.ragged_dot``.
- ``dense``: every expert on every token, then masked; a test oracle only.

Pairs whose expert id equals ``num_experts`` are skipped (used for novices and padding).

:func:`expert_parallel_dispatch` runs any of them with experts split over a mesh's ``expert``
axis: the collectives surround the experts alone, so attention and dense layers never repeat.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mone_jax.base.stats import FIELDS, LayerStats, chan_merge

IMPLS = ("scan", "ragged", "dense")
DATA, EXPERT = "data", "expert"  # mesh axes: batch rows, routed experts
HIGHEST = jax.lax.Precision.HIGHEST


class Experts(NamedTuple):
    """A stack of SwiGLU experts stored as checkpoints store them (``[out, in]`` per expert, so loading is a
    copy, never a transpose): gate_up [E, 2f, d] (gate rows then up rows), down [E, d, f], optional biases."""

    gate_up: jax.Array
    down: jax.Array
    gate_up_bias: jax.Array | None = None
    down_bias: jax.Array | None = None


def silu_glu(gate: jax.Array, up: jax.Array) -> jax.Array:
    return jax.nn.silu(gate) * up


def default_impl() -> str:
    return "scan" if jax.default_backend() == "cpu" else "ragged"


def _linear(x, w):
    """``x @ w.T`` for a weight ``w`` [out, in] (the product reads ``w`` as stored: no transposed copy)."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _expert_mlp(x, gate_up, down, glu, b_gu=None, b_d=None):
    h = _linear(x, gate_up)
    if b_gu is not None:
        h = h + b_gu
    f = h.shape[-1] // 2
    a = glu(h[..., :f], h[..., f:]).astype(down.dtype)
    y = _linear(a, down)
    return y + b_d if b_d is not None else y


def _zero_stats(lead: tuple, d: int) -> LayerStats:
    """Float zeros for every field of :data:`~mone_jax.base.stats.FIELDS`, shape ``lead`` (+ [d] per dimension)."""
    return LayerStats(*(jnp.zeros((*lead, d) if f.per_dim else lead, jnp.float32) for f in FIELDS))


def block_size_for(num_pairs: int, num_experts: int, block: int | None) -> int:
    """Most rows per step: ``block`` if given, else the power of two >= pairs/expert in [8, 512]."""
    if block:
        return block
    per = max(1, num_pairs // max(num_experts, 1))
    return int(min(512, max(8, 1 << (per - 1).bit_length())))


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
) -> tuple[jax.Array, LayerStats | None]:
    """Apply routed experts: ``y[t] = sum_k weights[t,k] * expert_{ids[t,k]}(x[t])``.

    x [T, d]; expert_ids [T, k] int32 in [0, E] (E = skip); weights [T, k]. With ``stats_mask``
    ([T] bool: tokens that count) also returns the batch's :class:`~mone_jax.base.stats.LayerStats`.
    """
    T, k = expert_ids.shape
    E = experts.gate_up.shape[0]
    ids = expert_ids.reshape(-1).astype(jnp.int32)
    w = weights.reshape(-1).astype(jnp.float32)
    tok = jnp.repeat(jnp.arange(T, dtype=jnp.int32), k)
    fn = {"scan": _scan, "ragged": _ragged, "dense": _dense}[impl]
    valid = None if stats_mask is None else stats_mask[tok] & (ids < E)
    y, stats = fn(x, ids, w, tok, experts, valid, glu, block)
    return y.astype(x.dtype), stats


def _chunk_sizes(block: int) -> tuple[int, ...]:
    """Row counts a step may process: multiples of block / 8 (at least 8 rows) up to ``block``."""
    g = max(8, block // 8)
    return tuple(range(g, block + 1, g)) if block % g == 0 else (block,)


def _scan(x, ids, w, tok, ex: Experts, valid, glu, block):
    """Pairs in expert order; each scan step runs the next (up to ``block``) rows of one expert,
    padded to the next chunk size, adds the weighted rows into y and merges the step's moments."""
    P, (T, d) = ids.shape[0], x.shape
    E = ex.gate_up.shape[0]
    B = block_size_for(P, E, block)
    sizes = _chunk_sizes(B)
    # rank pairs by expert (skip id E last) with a one-hot cumulative sum: cheaper than a sort
    onehot = (ids[:, None] == jnp.arange(E + 1)[None, :]).astype(jnp.int32)  # [P, E + 1]
    counts = onehot.sum(0)
    starts = jnp.cumsum(counts) - counts
    pos = starts[ids] + (jnp.cumsum(onehot, 0) * onehot).sum(1) - 1

    def by_pos(v, fill):  # v in expert-sorted order, B spare entries for the last step's padding
        return jnp.full((P + B,), fill, v.dtype).at[pos].set(v, unique_indices=True)

    s_tok, s_w = by_pos(tok, T), by_pos(w, 0.0)
    s_valid = by_pos(valid.astype(jnp.float32), 0.0) if valid is not None else None
    collect = s_valid is not None
    x_pad = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])
    counts = counts[:E]
    # next_e[e]: the first non-empty expert >= e (E when none)
    nonempty = jnp.append(counts > 0, True)
    next_e = jnp.flip(jax.lax.cummin(jnp.flip(jnp.where(nonempty, jnp.arange(E + 1), E + 1))))

    def compute(S, e, p):  # the only per-chunk-size code: the expert's rows, padded to B
        rows = jax.lax.dynamic_slice_in_dim(s_tok, p, S)
        yb = _expert_mlp(
            x_pad[rows], ex.gate_up[e], ex.down[e], glu,
            None if ex.gate_up_bias is None else ex.gate_up_bias[e],
            None if ex.down_bias is None else ex.down_bias[e],
        )
        return jnp.pad(yb, ((0, B - S), (0, 0)))

    def skip(e, p):
        return jnp.zeros((B, d), jnp.float32)

    branches = [skip] + [partial(compute, S) for S in sizes]

    def body(carry, _):
        e, rel, y, mom = carry
        ec = jnp.minimum(e, E - 1)
        n = jnp.where(e < E, jnp.minimum(counts[ec] - rel, B), 0)  # rows this step
        p = starts[ec] + rel
        yb = jax.lax.switch(jnp.where(n > 0, jnp.searchsorted(jnp.array(sizes), n) + 1, 0), branches, ec, p)
        ok = (jnp.arange(B) < n).astype(jnp.float32)
        wb = jax.lax.dynamic_slice_in_dim(s_w, p, B) * ok
        y = y.at[jax.lax.dynamic_slice_in_dim(s_tok, p, B)].add(yb * wb[:, None])
        if collect:  # the step's statistics merged into expert ec's running ones
            m = jax.lax.dynamic_slice_in_dim(s_valid, p, B) * ok
            st = _moments(yb, m, wb, lambda v: jnp.dot(m, v, precision=HIGHEST))
            merged = chan_merge(tuple(a[ec] for a in mom), st)
            mom = LayerStats(*(a.at[ec].set(v) for a, v in zip(mom, merged)))
        done = rel + n >= counts[ec]
        return (jnp.where(done, next_e[jnp.minimum(e + 1, E)], e), jnp.where(done, 0, rel + n), y, mom), None

    mom = _zero_stats((E,), d) if collect else ()
    init = (next_e[0], jnp.zeros((), jnp.int32), jnp.zeros((T + 1, d), jnp.float32), mom)
    if collect:  # statistics are never differentiated: a loop of exactly the sum of ceil(count / B) steps
        steps = ((counts + B - 1) // B).sum()
        _, _, y, mom = jax.lax.fori_loop(0, steps, lambda _, c: body(c, None)[0], init)
    else:  # differentiable: a fixed length, at most P // B + E steps (empty experts are skipped)
        (_, _, y, mom), _ = jax.lax.scan(body, init, None, length=P // B + E)
    return y[:T], (mom._replace(count=mom.count.astype(jnp.int32)) if collect else None)  # float32: exact to 2^24


def _combine(y_pairs: jax.Array, w: jax.Array, T: int) -> jax.Array:
    """Per-token weighted sum of per-pair outputs (pairs token-major, k per token)."""
    return (y_pairs * w[:, None]).reshape(T, -1, y_pairs.shape[-1]).sum(1)


def _moments(y, m, w, total: Callable, per_row: Callable = lambda a: a) -> LayerStats:
    """Every statistic of :data:`~mone_jax.base.stats.FIELDS` over rows ``y`` [rows, d] with routing weights ``w``
    and counting mask ``m`` (1.0 / 0.0): ``total(v)`` sums per-row values ``v`` [rows, ...] per expert,
    ``per_row`` maps per-expert values back to rows (the mean / m2 pair is two-pass: deviations from the
    group's own mean)."""
    n = total(m)
    mean = total(y * m[:, None]) / jnp.maximum(n, 1.0)[..., None]
    dev = y - per_row(mean)
    values = {"count": n, "mean": mean, "m2": total(jnp.square(dev) * m[:, None])}
    def value(f):
        if f.kind == "sum":
            return total((m[:, None] if f.per_dim else m) * f.row(y, w))
        if f.kind in values:
            return values[f.kind]
        return jnp.zeros_like(mean if f.per_dim else n)  # host-only (reference) fields

    return LayerStats(*(value(f) for f in FIELDS))


def _segment_stats(y, seg, valid, w, E) -> LayerStats:
    """Per-expert statistics over rows ``y`` with expert ``seg`` (E = skip)."""

    def total(v):
        return jax.ops.segment_sum(v, seg, E + 1)[:E]

    stats = _moments(y, valid.astype(jnp.float32), w, total, lambda a: a[jnp.minimum(seg, E - 1)])
    return stats._replace(count=total(valid.astype(jnp.int32)))


def _ragged_linear(x, w, sizes):
    """Rows of ``x`` grouped by expert (``sizes``) times their expert's ``w[e].T`` (``w`` [E, out, in])."""
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    return jax.lax.ragged_dot_general(x, w, sizes, dims, preferred_element_type=jnp.float32)


def _ragged(x, ids, w, tok, ex: Experts, valid, glu, block):
    E = ex.gate_up.shape[0]
    order = jnp.argsort(ids, stable=True)
    sid = ids[order]
    sizes = jnp.bincount(ids, length=E + 1)[:E].astype(jnp.int32)
    xs = x[tok[order]]
    h = _ragged_linear(xs, ex.gate_up, sizes)
    e_c = jnp.minimum(sid, E - 1)
    if ex.gate_up_bias is not None:
        h = h + ex.gate_up_bias[e_c]
    f = h.shape[-1] // 2
    a = glu(h[:, :f], h[:, f:]).astype(ex.down.dtype)
    y = _ragged_linear(a, ex.down, sizes)
    if ex.down_bias is not None:
        y = y + ex.down_bias[e_c]
    y = jnp.where((sid < E)[:, None], y, 0.0)
    out = _combine(jnp.zeros_like(y).at[order].set(y), w, x.shape[0])
    if valid is None:
        return out, None
    return out, _segment_stats(y, sid, valid[order], w[order], E)


def _dense(x, ids, w, tok, ex: Experts, valid, glu, block):
    E = ex.gate_up.shape[0]
    y_all = jax.vmap(
        lambda gu, dn, bgu, bd: _expert_mlp(x, gu, dn, glu, bgu, bd),
        in_axes=(0, 0, 0 if ex.gate_up_bias is not None else None, 0 if ex.down_bias is not None else None),
    )(ex.gate_up, ex.down, ex.gate_up_bias, ex.down_bias)  # [E, T, d]
    y_pairs = jnp.where((ids < E)[:, None], y_all[jnp.minimum(ids, E - 1), tok], 0.0)
    out = _combine(y_pairs, w, x.shape[0])
    if valid is None:
        return out, None
    return out, _segment_stats(y_pairs, ids, valid, w, E)


def merge_over(stats: LayerStats, axis: str) -> LayerStats:
    """Statistics of disjoint token shards merged over mesh ``axis`` (inside shard_map): all-gathered,
    then folded with the same :func:`~mone_jax.base.stats.chan_merge` as every other merge."""
    g = jax.lax.all_gather(stats, axis)
    out = tuple(a[0] for a in g)
    for i in range(1, g.count.shape[0]):
        out = chan_merge(out, tuple(a[i] for a in g))
    return LayerStats(*out)


def expert_parallel_dispatch(x, expert_ids, weights, experts: Experts, *, mesh, stats_mask=None, **kw):
    """:func:`dispatch` inside a ``shard_map`` over ``mesh`` (axes ``data``, ``expert``): token rows split
    over both axes, the E / X local expert rows of this device.

    The rows of the device's ``expert`` group are all-gathered, the pairs routed to local experts
    run (every other id becomes the local skip id), and the partial outputs are summed and
    scattered back to their rows (``psum_scatter``): collectives surround the experts alone.
    Statistics cover the local experts and are merged over ``data`` (:func:`merge_over`).
    """
    X, D = mesh.shape[EXPERT], mesh.shape[DATA]
    if X > 1:
        x, expert_ids, weights, stats_mask = jax.lax.all_gather((x, expert_ids, weights, stats_mask), EXPERT,
                                                                tiled=True)
    K = experts.gate_up.shape[0]
    local = expert_ids - jax.lax.axis_index(EXPERT) * K
    local = jnp.where((local >= 0) & (local < K), local, K)
    y, stats = dispatch(x, local, weights, experts, stats_mask=stats_mask, **kw)
    if X > 1:
        y = jax.lax.psum_scatter(y, EXPERT, tiled=True)
    return y, (merge_over(stats, DATA) if stats is not None and D > 1 else stats)
