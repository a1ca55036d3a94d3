"""Sequences sampled from the model itself (calibration data ``self``): seeded temperature / top-p.

Every sequence starts with the model's BOS token (EOS where it has none) and runs to its full length
(an EOS does not end it); tokens come from the KV-cache decoder (:func:`mone_jax.model.decoding.decode`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from mone_jax.base.errors import UserError
from mone_jax.model.causal_lm import MoEForCausalLM
from mone_jax.model.decoding import decode


def start_token(model: MoEForCausalLM) -> int:
    """The model's BOS id, else its (first) EOS id, else 0."""
    cfg = model.config
    for tok in (cfg.bos_token_id, cfg.eos_token_id):
        if tok is not None and 0 <= tok < cfg.vocab_size:
            return tok
    return 0


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
    first = start_token(model)

    def sample(num_samples: int, seq_len: int, seed: int) -> np.ndarray:
        if num_samples < 1 or seq_len < 1:
            raise UserError(f"--num-samples ({num_samples}) and --seq-len ({seq_len}) must be positive")
        bs = min(batch_size, num_samples)
        root = jax.random.key(seed)
        prompt = np.full((bs, 1), first, np.int32)
        out = [np.concatenate([prompt, decode(model, prompt, np.ones_like(prompt, bool), jax.random.fold_in(root, b),
                                              seq_len - 1, temperature=temperature, top_p=top_p)], axis=1)
               for b in range(-(-num_samples // bs))]
        return np.concatenate(out)[:num_samples]

    return sample
