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
    columns]."""
    (b0, b1), cols = spec.block, w.shape[-1]
    out, r, g = [], 0, 0
    for rows, grid in spec.parts:
        s = scale[..., g:g + grid, :].astype(jnp.float32)
        s = jnp.repeat(jnp.repeat(s, b0, axis=-2)[..., :rows, :], b1, axis=-1)[..., :cols]
        out.append(w[..., r:r + rows, :].astype(jnp.float32) * s)
        r, g = r + rows, g + grid
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=-2)


def _sum(x: jax.Array) -> jax.Array:
    return jnp.sum(x, dtype=jnp.float32)


@functools.cache
def block_updater(mesh: Mesh | None, spec: Blocks, dtype: jnp.dtype):
    """A compiled ``(out, total, w, scale, start) -> (out, total)``: rows ``start..`` of the expert stack
    ``out`` (donated: updated in place) := the dequantized block ``w``, ``scale`` in ``dtype``; ``total`` plus
    the block's float32 sum (the NaN / Inf check). With ``mesh`` every array is split over its ``expert``
    axis and each device writes its own block at ``start`` of its own rows."""

    def update(out, total, w, scale, start):
        x = dequantize(w, scale, spec)
        return jax.lax.dynamic_update_slice_in_dim(out, x.astype(dtype), start, 0), total + _sum(x)

    if mesh is None:
        return jax.jit(update, donate_argnums=0)

    def local(out, total, w, scale, start):
        out, part = update(out, jnp.float32(0), w, scale, start)
        return out, total + jax.lax.psum(part, EXPERT)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(EXPERT), P(), P(EXPERT), P(EXPERT), P()),
                                 out_specs=(P(EXPERT), P())), donate_argnums=0)
