"""Autoregressive decoding: ``generate`` new tokens from token-id prompts."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mone_jax.errors import UserError
from mone_jax.model import MoEForCausalLM
from mone_jax.sampling import next_token


def generate(model: MoEForCausalLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0, eos_token_id: int | Sequence[int] | None = None,
             pad_id: int | None = None) -> list[list[int]]:
    """New tokens for each prompt (up to ``max_new_tokens``, stopping after an EOS, which is included).

    ``temperature`` 0 is greedy; otherwise tokens are drawn at that temperature with ``seed``.
    ``eos_token_id`` defaults to the model config's; ``pad_id`` fills the padding of shorter prompts.
    """
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    eos = eos_token_id if eos_token_id is not None else model.config.eos_token_id
    stop = set() if eos is None else ({int(eos)} if isinstance(eos, (int, np.integer)) else {int(e) for e in eos})
    key = jax.random.key(seed)
    out = []
    for p, prompt in enumerate(prompts):
        ids = list(int(t) for t in prompt)
        if not ids:
            raise UserError(f"prompt {p} is empty; give at least one token")
        new: list[int] = []
        for t in range(max_new_tokens):
            logits = model(jnp.asarray([ids], jnp.int32))[:, -1]
            tok = int(next_token(logits, jax.random.fold_in(jax.random.fold_in(key, p), t), float(temperature), 1.0)[0])
            new.append(tok)
            ids.append(tok)
            if tok in stop:
                break
        out.append(new)
    return out
