"""Per-token log-likelihoods of right-padded token batches, data-parallel over a device mesh.

The scoring side of zero-shot evaluation (:mod:`mone_jax.app.harness`): requests are cut into batches
of a fixed row count, each padded to a *bucket* length (a power of two), so that a whole task
compiles a handful of shapes; rows are split over every device of the mesh.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mone_jax.evaluate.perplexity import token_logprobs
from mone_jax.model.causal_lm import MoEForCausalLM
from mone_jax.model.sharding import batch_spec, padded_rows, place

_LOGIT_ELEMENTS = 1 << 25  # float32 logits computed at once (128 MiB): positions are chunked to fit
MIN_BUCKET = 16


def bucket_length(n: int, limit: int) -> int:
    """The padded length of a batch whose longest row has ``n`` tokens: the next power of two (at least
    MIN_BUCKET), at most ``limit``."""
    return min(max(MIN_BUCKET, 1 << max(0, n - 1).bit_length()), max(limit, n))


def _token_scores(graphdef, state, ids, mask, chunk: int):
    """log p(ids[:, t + 1] | ids[:, :t + 1]) [B, T - 1] (float32) and whether that token is the argmax."""
    model = nnx.merge(graphdef, state)
    h, _ = model.hidden_states(ids, mask)
    return token_logprobs(model, h, ids, chunk)


class TokenScorer:
    """Scores token sequences with ``model`` on ``mesh``: rows split over every device, parameters as the
    model holds them (placed by :func:`~mone_jax.convert.load.load_hf` with the same mesh)."""

    def __init__(self, model: MoEForCausalLM, mesh: Mesh, batch_size: int = 8):
        self.model, self.mesh = model, mesh
        self.rows = padded_rows(batch_size, mesh)  # every batch has this many rows (a multiple of the devices)
        self.max_length = model.config.max_position_embeddings
        self.graphdef, self.state = nnx.split(model)
        replicated = NamedSharding(mesh, P())
        self._fn = jax.jit(partial(_token_scores, self.graphdef), static_argnums=3,
                           out_shardings=(replicated, replicated))

    def score(self, seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Per-token log-probabilities and greedy flags [len(seqs), T - 1] of a batch of at most
        ``self.rows`` sequences (position t scores token t + 1; right padding beyond each sequence)."""
        n = len(seqs)
        T = bucket_length(max(len(s) for s in seqs), self.max_length)
        ids = np.zeros((self.rows, T), np.int32)
        mask = np.zeros((self.rows, T), bool)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s
            mask[i, :len(s)] = True
        spec = batch_spec(self.mesh)
        chunk = max(1, min(self.rows * (T - 1), _LOGIT_ELEMENTS // self.model.config.vocab_size))
        logp, greedy = self._fn(self.state, place(ids, spec, self.mesh), place(mask, spec, self.mesh), chunk)
        return np.asarray(logp)[:n], np.asarray(greedy)[:n]
