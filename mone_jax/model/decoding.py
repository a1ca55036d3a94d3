"""Autoregressive decoding with a KV cache: a prefill of the (left-padded) prompts, then one-token steps.

Every layer keeps a preallocated cache of S = prompt + new-token slots (GQA: keys and values after
norm, clipping and RoPE; MLA: the compressed kv latent and the rotated key, see
:meth:`~mone_jax.model.mla.MLAttention.cached`); each step writes one slot with ``dynamic_update_slice``.
Prompts are left-padded, positions come from the attention mask, and sliding-window layers mask the
slots outside their window. The prefill runs the forward's own attention over the prompt, the steps
run inside one ``lax.while_loop``; prompt lengths, new-token counts and batch sizes are rounded up to
powers of two so that few shapes compile. MoE statistics are never collected here.

With a device ``mesh`` (as :func:`~mone_jax.convert.load.load_hf` places the model on it), decoding is
data-parallel: prompt rows and every layer's cache are split over all the mesh's devices (batches
padded with one-token filler rows to a multiple of the device count), the parameters stay as placed
(experts split over ``expert``), and the new tokens come back replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mone_jax.base.errors import UserError
from mone_jax.model.causal_lm import MASK_VALUE, MoEForCausalLM, attention_biases
from mone_jax.model.rope import rope_at
from mone_jax.model.sharding import batch_spec, padded_rows, param_specs, place

GENERATE_BATCH = 32  # most prompts decoded together by `generate`


def next_token(logits: jax.Array, key: jax.Array, temperature, top_p: float) -> jax.Array:
    """Token ids [B] drawn from logits [B, V] at ``temperature`` (0 = greedy; may be traced) within the
    top-p nucleus."""
    greedy = jnp.argmax(logits, -1).astype(jnp.int32)
    if isinstance(temperature, (int, float)) and temperature == 0:
        return greedy
    logits = logits.astype(jnp.float32) / jnp.where(temperature == 0, 1.0, temperature)
    if top_p < 1:
        logits = jnp.where(nucleus(logits, top_p), logits, -jnp.inf)
    return jnp.where(temperature == 0, greedy, jax.random.categorical(key, logits, -1).astype(jnp.int32))


def nucleus(logits: jax.Array, top_p: float) -> jax.Array:
    """The top-p nucleus of logits [B, V] as a mask: the most likely tokens, in order, until their mass reaches
    ``top_p`` (ties of the last one included), i.e. every logit >= the smallest logit v whose strictly larger
    logits weigh less than ``top_p``. Found without sorting (a sort of the vocabulary per step costs more than
    the model's step on CPU): a bisection over the logits' order-preserving unsigned-integer keys, 32 halvings."""
    probs = jax.nn.softmax(logits, -1)
    bits = jax.lax.bitcast_convert_type(logits, jnp.uint32)
    keys = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))  # float order == unsigned order

    def light(k):  # mass of the tokens above key k < top_p, per row
        return jnp.sum(jnp.where(keys > k[:, None], probs, 0.0), -1) < top_p

    def halve(_, lohi):
        lo, hi = lohi  # light(lo) false, light(hi) true
        mid = lo + (hi - lo) // 2
        ok = light(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    lo = jnp.maximum(keys.min(-1), 1) - 1  # above it: every token, mass 1 (no wrap below key 0)
    _, hi = jax.lax.fori_loop(0, 32, halve, (lo, keys.max(-1)))
    return keys >= hi[:, None]


def init_cache(model: MoEForCausalLM, batch: int, slots: int) -> list[tuple[jax.Array, ...]]:
    """Empty per-layer caches of ``slots`` positions."""
    return [layer.mixer.init_cache(batch, slots, model.dtype) for layer in model.layers]


def cache_biases(slot_mask: jax.Array, start, count: int, windows: set[int | None]) -> dict[int | None, jax.Array]:
    """Additive masks [B, T, S] for ``count`` queries at slots ``start``.. over a cache whose filled,
    non-padding slots are ``slot_mask`` [B, S] (causal, and per sliding window size)."""
    S = slot_mask.shape[1]
    q = start + jnp.arange(count)[:, None]
    kv = jnp.arange(S)[None, :]
    out = {}
    for w in windows:
        ok = (kv <= q) if w is None else (kv <= q) & (q - kv < w)
        out[w] = jnp.where(ok[None] & slot_mask[:, None, :], 0.0, MASK_VALUE).astype(jnp.float32)
    return out


def cached_hidden(model: MoEForCausalLM, ids: jax.Array, positions: jax.Array, cache: list, slot_mask: jax.Array,
                  start, prefill: bool) -> tuple[jax.Array, list]:
    """Final normed hidden states [B, T, d] of tokens ``ids`` [B, T] at ``positions`` [B, T], written into
    ``cache`` at slots ``start``..; ``prefill`` (start 0): the prompt, attending among itself."""
    cos, sin = rope_at(model.config.rope, positions, model.dtype)
    windows = {layer.window for layer in model.layers}
    T = ids.shape[1]
    biases = (attention_biases(slot_mask[:, :T], windows) if prefill
              else cache_biases(slot_mask, start, T, windows))
    x = model.embed[...][ids]
    new = []
    for layer, c in zip(model.layers, cache):
        x, c = layer.cached(x, cos, sin, biases[layer.window], c, start, prefill, model.impl, model.block)
        new.append(c)
    return model.norm(x), new


@partial(jax.jit, static_argnums=(0, 5, 7, 11))
def _decode(graphdef, state, ids, mask, key, slots: int, temperature, top_p: float, max_new, stop, pad,
            mesh: Mesh | None):
    """New tokens [B, slots - T] (``pad`` after a stop token and past ``max_new``) for left-padded prompts
    ids, mask [B, T]; the key is split once per token, before drawing it. With a ``mesh`` the caches are
    split by rows over all its devices and the tokens returned replicated.

    The prefill caches all prompt tokens but the last; every step feeds one token (first the prompt's last)
    and picks the next, so a one-token prompt compiles no prefill."""
    model = nnx.merge(graphdef, state)
    B, T = ids.shape
    width = slots - T

    def by_rows(cache):
        return cache if mesh is None else jax.lax.with_sharding_constraint(
            cache, NamedSharding(mesh, batch_spec(mesh)))

    slot_mask = jnp.concatenate([mask, jnp.ones((B, width), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    cache = by_rows(init_cache(model, B, slots))
    if T > 1:
        _, cache = cached_hidden(model, ids[:, :-1], positions[:, :-1], cache, slot_mask, 0, True)

    def more(carry):
        j, *_, done = carry
        return (j < max_new) & ~jnp.all(done)

    def step(carry):
        j, tok, cache, key, out, done = carry
        h, cache = cached_hidden(model, tok[:, None], (positions[:, -1] + j)[:, None], cache, slot_mask, T - 1 + j,
                                 False)
        key, sub = jax.random.split(key)
        tok = jnp.where(done, pad, next_token(model.logits(h[:, 0]), sub, temperature, top_p))
        done = done | jnp.any(tok[:, None] == stop[None, :], axis=-1)
        return j + 1, tok, by_rows(cache), key, out.at[:, j].set(tok), done

    out = jnp.full((B, width), pad, jnp.int32)
    out = jax.lax.while_loop(more, step, (0, ids[:, -1], by_rows(cache), key, out, jnp.zeros((B,), bool)))[4]
    return out if mesh is None else jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P()))


def _bucket(n: int) -> int:
    """The power of two >= n."""
    return 1 << max(n - 1, 0).bit_length()


def decode(model: MoEForCausalLM, ids: np.ndarray, mask: np.ndarray, key: jax.Array, max_new: int, *,
           temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[int] = (), pad: int = 0,
           mesh: Mesh | None = None) -> np.ndarray:
    """New tokens int32 [B, max_new] for left-padded prompts ``ids``, ``mask`` [B, T] (T and ``max_new``
    rounded up to powers of two for compilation); after a ``stop`` token a row holds ``pad``. With a
    ``mesh`` (B a multiple of its device count) rows are decoded data-parallel over its devices."""
    return np.asarray(_decode(*decode_arguments(model, ids, mask, key, max_new, temperature=temperature,
                                                top_p=top_p, stop=stop, pad=pad, mesh=mesh)))[:, :max_new]


def decode_arguments(model: MoEForCausalLM, ids: np.ndarray, mask: np.ndarray, key: jax.Array, max_new: int, *,
                     temperature: float, top_p: float, stop: Sequence[int], pad: int, mesh: Mesh | None) -> tuple:
    """The arguments of the compiled decoding program for :func:`decode`'s inputs (prompts padded to a bucket
    length and, with a ``mesh``, split by rows over its devices; parameters placed as the model holds them)."""
    B, T = ids.shape
    if mesh is not None and B % mesh.size:
        raise ValueError(f"{B} rows do not split over the mesh's {mesh.size} devices")
    Tb = _bucket(T)
    ids = np.pad(np.asarray(ids, np.int32), ((0, 0), (Tb - T, 0)), constant_values=pad)
    mask = np.pad(np.asarray(mask, bool), ((0, 0), (Tb - T, 0)))
    stops = np.full(_bucket(len(stop)), -1, np.int32)  # -1 never matches: one shape for 0 or 1 stop ids
    stops[: len(stop)] = stop
    graphdef, state = nnx.split(model)
    if mesh is not None:  # parameters already on the mesh (load_hf) stay where they are
        state = place(state, param_specs(state), mesh)
        ids, mask = (place(a, batch_spec(mesh), mesh) for a in (ids, mask))
    return (graphdef, state, jnp.asarray(ids), jnp.asarray(mask), key, Tb + _bucket(max_new), jnp.float32(temperature),
            float(top_p), jnp.int32(max_new), jnp.asarray(stops), jnp.int32(pad), mesh)


def generate(model: MoEForCausalLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0, eos_token_id: int | Sequence[int] | None = None,
             pad_id: int | None = None, mesh: Mesh | None = None) -> list[list[int]]:
    """New tokens for each prompt (up to ``max_new_tokens``, stopping after an EOS, which is included).

    ``temperature`` 0 is greedy (as transformers' ``generate(do_sample=False)``); otherwise tokens are drawn
    at that temperature from keys derived from ``seed``. ``eos_token_id`` defaults to the model config's;
    ``pad_id`` (default: the EOS id, else 0) fills the left padding of shorter prompts. Prompts are decoded
    in batches of up to ``GENERATE_BATCH`` of similar length, each with a KV cache; with a ``mesh`` (the
    one the model was loaded onto) each batch is split over its devices, with the same tokens as on one.
    A prompt plus ``max_new_tokens`` may not exceed the model's ``max_position_embeddings``.
    """
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    vocab = model.config.vocab_size
    prompts = [[int(t) for t in p] for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise UserError(f"prompt {i} is empty; give at least one token")
        if not all(0 <= t < vocab for t in p):
            raise UserError(f"prompt {i} holds token ids outside the vocabulary [0, {vocab}); check the tokenizer")
    limit = model.config.max_position_embeddings
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]), default=None)
    if longest is not None and len(prompts[longest]) + max_new_tokens > limit:
        raise UserError(f"prompt {longest} ({len(prompts[longest])} tokens) + {max_new_tokens} new tokens exceeds "
                        f"the model's max_position_embeddings {limit}: shorten the prompt or ask for fewer new tokens")
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    stop = [] if eos is None else [int(eos)] if isinstance(eos, (int, np.integer)) else [int(e) for e in eos]
    pad = pad_id if pad_id is not None else (stop[0] if stop else 0)
    if not 0 <= pad < vocab:
        raise UserError(f"pad_id {pad} lies outside the vocabulary [0, {vocab}); give a token id of the model")
    if max_new_tokens == 0 or not prompts:
        return [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    root = jax.random.key(seed)
    out: dict[int, list[int]] = {}
    for b, first in enumerate(range(0, len(order), GENERATE_BATCH)):
        chunk = order[first:first + GENERATE_BATCH]
        rows = _bucket(len(chunk)) if mesh is None else padded_rows(_bucket(len(chunk)), mesh)
        T = max(len(prompts[i]) for i in chunk)
        ids = np.full((rows, T), pad, np.int32)
        mask = np.zeros((rows, T), bool)
        mask[len(chunk):, -1] = True  # filler rows: one token each
        for r, i in enumerate(chunk):
            ids[r, T - len(prompts[i]):] = prompts[i]
            mask[r, T - len(prompts[i]):] = True
        new = decode(model, ids, mask, jax.random.fold_in(root, b), max_new_tokens, temperature=temperature,
                     stop=stop, pad=pad, mesh=mesh)
        for r, i in enumerate(chunk):
            row = new[r].tolist()
            ends = [j for j, t in enumerate(row) if t in stop]
            out[i] = row[: ends[0] + 1] if ends else row
    return [out[i] for i in range(len(prompts))]
