"""Sequences sampled from the model itself (calibration data ``self``): seeded temperature / top-p.

Every sequence starts with the model's BOS token (EOS where it has none). Generation recomputes
the whole fixed-length sequence at each step (positions not yet sampled hold token 0 and, the
attention being causal, cannot affect earlier ones): one compiled loop with static shapes that
works for every family without a KV cache, at T forward passes per block.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mone_jax.errors import UserError
from mone_jax.model import MoEForCausalLM


def start_token(model: MoEForCausalLM) -> int:
    """The model's BOS id, else its (first) EOS id, else 0."""
    cfg = model.config
    for tok in (cfg.bos_token_id, cfg.eos_token_id):
        if tok is not None and 0 <= tok < cfg.vocab_size:
            return tok
    return 0


def next_token(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Token ids [B] drawn from logits [B, V] at ``temperature`` (0 = greedy) within the top-p nucleus."""
    if temperature == 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1:
        ordered = jnp.sort(logits, -1)[:, ::-1]
        probs = jax.nn.softmax(ordered, -1)
        kept = jnp.sum(jnp.cumsum(probs, -1) - probs < top_p, -1)  # >= 1: the nucleus size
        threshold = jnp.take_along_axis(ordered, (kept - 1)[:, None], -1)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, -1).astype(jnp.int32)


@partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _generate(graphdef, state, key, batch: int, seq_len: int, temperature: float, top_p: float, first):
    model = nnx.merge(graphdef, state)
    ids = jnp.zeros((batch, seq_len), jnp.int32).at[:, 0].set(first)

    def body(t, carry):
        ids, key = carry
        h, _ = model.hidden_states(ids)
        logits = model.logits(jax.lax.dynamic_index_in_dim(h, t - 1, axis=1, keepdims=False))
        key, sub = jax.random.split(key)
        return ids.at[:, t].set(next_token(logits, sub, temperature, top_p)), key

    ids, _ = jax.lax.fori_loop(1, seq_len, body, (ids, key))
    return ids


def sampler_for(model: MoEForCausalLM, *, temperature: float = 1.0, top_p: float = 0.95,
                batch_size: int = 16) -> Callable[[int, int, int], np.ndarray]:
    """``sampler(num_samples, seq_len, seed)`` -> int32 [num_samples, seq_len] sampled from ``model``.

    Blocks are generated ``batch_size`` at a time (one compilation per shape); batch b uses the
    key ``fold_in(key(seed), b)``, so the same arguments give the same tokens.
    """
    if temperature < 0:
        raise UserError(f"sampling temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must lie in (0, 1], got {top_p}")
    graphdef, state = nnx.split(model)
    first = jnp.int32(start_token(model))

    def sample(num_samples: int, seq_len: int, seed: int) -> np.ndarray:
        if num_samples < 1 or seq_len < 1:
            raise UserError(f"num_samples ({num_samples}) and seq_len ({seq_len}) must be positive")
        bs = min(batch_size, num_samples)
        root = jax.random.key(seed)
        out = [np.asarray(_generate(graphdef, state, jax.random.fold_in(root, b), bs, seq_len,
                                    float(temperature), float(top_p), first))
               for b in range(-(-num_samples // bs))]
        return np.concatenate(out)[:num_samples]

    return sample
