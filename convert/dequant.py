"""Dequantization on the device: a quantized tensor's stored bytes (float8 weights, block scales) are read
into device arrays as they are and turned into the compute dtype by a compiled step.

The math is :func:`mone_jax.convert.quant.scale_blocks`' (each float8 value exactly in float32, times its
block's float32 scale, the last block of a dimension partial), then the cast: the result equals the host
dequantization bit for bit. Tensors stacked along their rows (an expert's gate rows then up rows, experts
one after the other) keep each part's own block grid. Routed-expert stacks are dequantized a block of
experts at a time into their preallocated output (:func:`block_updater`), so a device never holds a layer's
float experts beside its quantized bytes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mone_jax.convert.quant import QuantTensor
from mone_jax.convert.reader import nonfinite_bits
from mone_jax.model.moe import EXPERT

_WEIGHTS = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
_SCALES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))


@dataclass(frozen=True)
class Blocks:
    """How a stack of quantized tensors becomes float32: per part along the rows, (weight rows, scale-grid
    rows); each part's blocks of ``block`` rows x columns (the last ones partial)."""

    parts: tuple[tuple[int, int], ...]
    block: tuple[int, int]


def on_device(q: QuantTensor | None, weight_dtype: np.dtype, scale_dtype: np.dtype) -> bool:
    """Whether tensors of ``q``'s kind are dequantized on the device: float8 weights with float scales
    (fine-grained FP8, compressed-tensors float-quantized); the other schemes are dequantized on the host."""
    return (q is not None and q.scheme.name in ("fp8-block", "ct-float") and np.dtype(weight_dtype) in _WEIGHTS
            and np.dtype(scale_dtype) in _SCALES)


def dequantize(w: jax.Array, scale: jax.Array, spec: Blocks) -> jax.Array:
    """float32 ``w`` [..., R, C] (stacked parts) times its parts' block scales ``scale`` [..., grid rows, grid
    columns]: the scales are spread over each part's rows (a small array), then multiplied into the weights
    in column blocks (columns padded to whole blocks, then cut: XLA fuses it into one pass; slicing the
    weights per part and concatenating measured 10x slower on CPU)."""
    (b0, b1), cols = spec.block, w.shape[-1]
    rows, g = [], 0
    for n, grid in spec.parts:
        rows.append(jnp.repeat(scale[..., g:g + grid, :].astype(jnp.float32), b0, axis=-2)[..., :n, :])
        g += grid
    s = rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=-2)  # [..., R, grid columns]
    blocks = s.shape[-1]
    x = w.astype(jnp.float32)
    if blocks * b1 != cols:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, blocks * b1 - cols)])
    x = (x.reshape(*x.shape[:-1], blocks, b1) * s[..., None]).reshape(*x.shape[:-1], blocks * b1)
    return x[..., :cols]


def _nonfinite(w: jax.Array, scale: jax.Array) -> jax.Array:
    """NaN where float8 ``w`` holds a NaN / Inf code (its bits, :func:`~.reader.all_finite`'s rule) or
    ``scale`` a NaN / Inf, else 0: integer work, far cheaper than summing the dequantized block. (A finite
    value times a finite scale that overflows is not seen here.)"""
    _, mask, least = nonfinite_bits(np.dtype(w.dtype))
    bits = jax.lax.bitcast_convert_type(w, jnp.uint8) & jnp.uint8(mask)
    return jnp.where(jnp.max(bits) >= least, jnp.float32(jnp.nan), jnp.float32(0)) + jnp.sum(scale, dtype=jnp.float32)


@functools.cache
def block_updater(mesh: Mesh | None, spec: Blocks, dtype: jnp.dtype):
    """A compiled ``(out, total, w, scale, start) -> (out, total)``: rows ``start..`` of the expert stack
    ``out`` (donated: updated in place) := the dequantized block ``w``, ``scale`` in ``dtype``; ``total`` plus
    NaN where the block holds NaN / Inf (:func:`_nonfinite`). With ``mesh`` every array is split over its
    ``expert`` axis and each device writes its own block at ``start`` of its own rows."""

    def update(out, total, w, scale, start):
        x = dequantize(w, scale, spec).astype(dtype)
        return jax.lax.dynamic_update_slice_in_dim(out, x, start, 0), total + _nonfinite(w, scale)

    if mesh is None:
        return jax.jit(update, donate_argnums=0)

    def local(out, total, w, scale, start):
        out, part = update(out, jnp.float32(0), w, scale, start)
        return out, total + jax.lax.psum(part, EXPERT)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(EXPERT), P(), P(EXPERT), P(EXPERT), P()),
                                 out_specs=(P(EXPERT), P())), donate_argnums=0)
