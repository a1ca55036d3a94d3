"""SparseMixer top-2 routing (Phi-MoE, GRIN-MoE; Liu et al. 2024, arXiv 2409.12136), inference path.

Each of the two picks is the best remaining logit; its weight is the softmax probability of that
expert among the candidates whose logit lies within a relative gap ``2 * eps`` of the pick,
``(pick - logit) / max(|logit|, pick) <= 2 * eps``. The second pick excludes the first from its
candidates. Each weight multiplies its own expert's output, per token, so a novice is defined as for
any softmax router. Training samples the picks (Gumbel) and corrects the gradient (Heun's method);
calibration and inference never do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _pick(logits: jax.Array, candidates: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """The best candidate [T] and its weight [T]: its softmax over the candidates within the relative gap."""
    masked = jnp.where(candidates, logits, -jnp.inf)
    ids = jnp.argmax(masked, axis=-1)
    top = jnp.max(masked, axis=-1, keepdims=True)
    near = ~((top - logits) / jnp.maximum(jnp.abs(logits), top) > 2 * eps)  # a NaN gap (0 / 0) counts as near
    probs = jax.nn.softmax(jnp.where(candidates & near, logits, -jnp.inf), axis=-1)
    return ids, jnp.take_along_axis(probs, ids[:, None], axis=-1)[:, 0]


def sparsemixer_top2(logits: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """Expert ids [T, 2] and routing weights [T, 2] of router logits [T, E] (float32)."""
    first, w1 = _pick(logits, jnp.ones(logits.shape, bool), eps)
    second, w2 = _pick(logits, jnp.arange(logits.shape[-1]) != first[:, None], eps)
    return jnp.stack([first, second], -1).astype(jnp.int32), jnp.stack([w1, w2], -1)
