"""Token-level perplexity in JAX: exp(mean next-token NLL over the predicted tokens of token blocks).

Token t of a row is *predicted* (from the tokens before it) when t >= 1 and both t and t - 1 are
real (mask 1) tokens; with right padding this is the Hugging Face ``labels`` convention.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from mone_jax.base.errors import UserError
from mone_jax.base.phases import phase
from mone_jax.base.tokens import token_ids
from mone_jax.calib.calibration import shard_batch
from mone_jax.model.causal_lm import MoEForCausalLM
from mone_jax.model.sharding import padded_rows, place, unpadded_specs

_LOGIT_ELEMENTS = 1 << 25  # float32 logits computed at once (128 MiB): positions are chunked to fit


def predicted(mask: np.ndarray) -> np.ndarray:
    """Bool [N, T - 1]: which targets ``ids[:, 1:]`` count (target and its previous token both real)."""
    m = np.asarray(mask).astype(bool)
    return m[:, 1:] & m[:, :-1]


def token_logprobs(model, h: jax.Array, ids: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """From hidden states h [B, T, d]: log p(ids[:, t + 1] | ids[:, :t + 1]) [B, T - 1] (float32) and whether
    that token is the argmax, with the LM head applied ``chunk`` rows at a time (never [B, T, vocab] at once)."""
    B, T, d = h.shape
    rows = B * (T - 1)
    pad = -rows % chunk
    hs = jnp.pad(h[:, :-1].reshape(rows, d), ((0, pad), (0, 0))).reshape(-1, chunk, d)
    target = jnp.pad(ids[:, 1:].reshape(rows), (0, pad)).reshape(-1, chunk)

    def score(args):
        hc, tc = args
        logits = model.logits(hc)
        picked = jnp.take_along_axis(logits, tc[:, None], -1)[:, 0]
        return picked - jax.nn.logsumexp(logits, -1), jnp.argmax(logits, -1) == tc

    logp, greedy = jax.lax.map(score, (hs, target))
    return logp.reshape(-1)[:rows].reshape(B, T - 1), greedy.reshape(-1)[:rows].reshape(B, T - 1)


@partial(jax.jit, static_argnums=(0, 4))
def _nll_sum(graphdef, state, ids, mask, chunk: int):
    """Sum of the NLL of a batch's predicted tokens (float32) and their count."""
    model = nnx.merge(graphdef, state)
    h, _ = model.hidden_states(ids, mask)
    B, T, _ = h.shape
    rows = B * (T - 1)
    per_token = -token_logprobs(model, h, ids, chunk)[0].reshape(rows)
    valid = (mask[:, 1:] & mask[:, :-1]).reshape(rows)
    return jnp.sum(jnp.where(valid, per_token, 0.0)), valid.sum(dtype=jnp.int32)


_SHAPES_SEEN: set = set()  # the step programs traced in this process (a compile: phase line for each new one)


def _new_program(graphdef, state, batch_shape: tuple[int, int], chunk: int) -> bool:
    """Whether :func:`_nll_sum` has not yet traced a step for this model structure, parameter shapes and batch."""
    leaves = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(state))
    key = (graphdef, jax.tree.structure(state), leaves, batch_shape, chunk)
    if key in _SHAPES_SEEN:
        return False
    _SHAPES_SEEN.add(key)
    return True


def perplexity(model: MoEForCausalLM, ids: np.ndarray, mask: np.ndarray | None = None, *, batch_size: int = 8,
               progress: bool = False, lines: bool = True, mesh: Mesh | None = None) -> dict:
    """``{"perplexity", "nll", "tokens"}`` of ``model`` on int token ids [N, T] (``mask``: 1 = real token).

    Rows are evaluated ``batch_size`` at a time (the last batch padded with masked rows, so one
    shape compiles once); NLL sums are accumulated in float64 on the host. With a ``mesh``, a batch's rows
    (``batch_size`` rounded up to the device count, padded as calibration pads them) are split over its
    devices and the parameters laid out by :func:`~mone_jax.model.sharding.unpadded_specs`; jit partitions
    the step. Phase lines: ``compile`` when the step compiles, ``evaluate`` unless ``lines`` is false (a caller
    reporting its own progress).
    """
    ids = token_ids(ids, model.config.vocab_size, "the evaluation data")
    if ids.shape[1] < 2:
        raise UserError(f"evaluation needs token ids [N, T] with T >= 2, got {list(ids.shape)}")
    mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    if mask.shape != ids.shape:
        raise UserError(f"attention mask shape {list(mask.shape)} differs from the ids' {list(ids.shape)}")
    bs = max(1, min(batch_size, ids.shape[0]))
    bs = bs if mesh is None else padded_rows(bs, mesh)
    pad = -ids.shape[0] % bs
    ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)]).astype(np.int32)
    mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), bool)])
    chunk = max(1, min(bs * (ids.shape[1] - 1), _LOGIT_ELEMENTS // model.config.vocab_size))
    graphdef, state = nnx.split(model)
    rows = jnp.asarray if mesh is None else partial(shard_batch, mesh=mesh)
    if mesh is not None:
        state = place(state, unpadded_specs(state, mesh), mesh)
    total, count, bar = 0.0, 0, None
    for i in range(0, ids.shape[0], bs):
        if bar is None and _new_program(graphdef, state, (bs, ids.shape[1]), chunk):
            phase("compile", "the evaluation step")
        s, n = _nll_sum(graphdef, state, rows(ids[i:i + bs]), rows(mask[i:i + bs]), chunk)
        if bar is None:  # started once compiled: its rate is the real one
            nb = ids.shape[0] // bs
            if lines:
                phase("evaluate", f"{nb} batch{'es' if nb != 1 else ''} of {bs} x {ids.shape[1]} tokens")
            bar = tqdm(desc="evaluating", unit="batch", disable=not progress, total=nb)
        bar.update(1)
        total += float(s)
        count += int(n)
    bar.close()
    if count == 0:
        raise UserError("the evaluation data has no predicted tokens (every row has fewer than 2 real tokens)")
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count}


def unigram_perplexity(train_ids: np.ndarray, ids: np.ndarray, vocab_size: int,
                       mask: np.ndarray | None = None) -> float:
    """Perplexity of an add-one smoothed unigram model of ``train_ids`` on the predicted tokens of ``ids``."""
    counts = np.bincount(np.asarray(train_ids).reshape(-1), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    ids = np.asarray(ids)
    keep = predicted(np.ones(ids.shape, bool) if mask is None else mask)
    return float(np.exp(-logp[ids[:, 1:]][keep].mean()))
