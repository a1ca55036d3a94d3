"""Rotary position embeddings for the RoPE variants the supported families use."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mone_jax.base.config import RopeConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention-magnitude correction 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_scale(rope: RopeConfig, long: bool = False) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rotary_dim / 2] (float32, as transformers computes them) and cos/sin scale;
    ``long``: for a sequence longer than ``original_max_position_embeddings`` (see ``RopeConfig.by_length``)."""
    inv, scale = _inv_freq_and_scale(rope, long)
    if rope.short_mscale is not None:  # Phi-MoE: its own scale per length, whatever the type
        scale = rope.long_mscale if long else rope.short_mscale
    return inv, float(scale)


def _inv_freq_and_scale(rope: RopeConfig, long: bool) -> tuple[np.ndarray, float]:
    dim, base = rope.rotary_dim, rope.theta
    pos = base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))
    inv = (1.0 / pos).astype(np.float32)
    if rope.type == "default":
        return inv, 1.0
    if rope.type == "linear":
        return (inv / np.float32(rope.factor)).astype(np.float32), 1.0
    if rope.type == "llama3":
        old = rope.original_max_position_embeddings
        low_wl, high_wl = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if rope.type == "longrope":  # LongRoPE (Phi-3): per-frequency divisors, short or long by sequence length
        factors = np.asarray(rope.long_factor if long else rope.short_factor, np.float32)
        att = rope.attention_factor
        if att is None:
            orig = rope.original_max_position_embeddings
            att = 1.0 if rope.factor <= 1 else math.sqrt(1 + math.log(rope.factor) / math.log(orig))
        return (1.0 / (factors * pos)).astype(np.float32), float(att)
    # yarn
    factor = rope.factor
    att = rope.attention_factor
    if att is None:
        if rope.mscale and rope.mscale_all_dim:
            att = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
        else:
            att = yarn_mscale(factor)
    orig = rope.original_max_position_embeddings

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(rope.beta_fast), corr_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extra = (1 - ramp).astype(np.float32)
    interp = (1.0 / (np.float32(factor) * pos)).astype(np.float32)
    return (interp * (1 - extra) + inv * extra).astype(np.float32), float(att)


def rope_tables(rope: RopeConfig, seq_len: int, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T, rotary_dim] for positions 0..T-1 (halves duplicated, as transformers does)."""
    return rope_at(rope, jnp.arange(seq_len), dtype)


def rope_at(rope: RopeConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [*positions.shape, rotary_dim] at integer ``positions`` (e.g. [B, T] under left padding).

    Length-dependent RoPE takes the long tables when the sequence, ``max(positions) + 1`` as transformers
    counts it, exceeds ``original_max_position_embeddings``."""
    if not rope.by_length:
        return _tables(rope, positions, dtype, False)
    long = jnp.max(positions) + 1 > rope.original_max_position_embeddings
    return tuple(jnp.where(long, a, b) for a, b in zip(_tables(rope, positions, dtype, True),
                                                        _tables(rope, positions, dtype, False)))


def _tables(rope: RopeConfig, positions: jax.Array, dtype, long: bool) -> tuple[jax.Array, jax.Array]:
    inv, scale = inv_freq_and_scale(rope, long)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleave: bool = False) -> jax.Array:
    """Rotate the first ``cos.shape[-1]`` dims of x [B, T, H, D] by cos, sin [T, r] or [B, T, r]; the rest
    pass through."""
    r = cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    if interleave:  # DeepSeek-V3: pairs (0,1),(2,3).. are regrouped to halves before rotating
        xr = jnp.concatenate([xr[..., 0::2], xr[..., 1::2]], axis=-1)
    c, s = (cos[None, :, None, :], sin[None, :, None, :]) if cos.ndim == 2 else (cos[:, :, None], sin[:, :, None])
    half = r // 2
    rot = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    out = xr * c + rot * s
    return jnp.concatenate([out, xp], axis=-1) if xp.shape[-1] else out
