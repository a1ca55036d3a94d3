"""One jitted calibration step per batch; batch statistics merged exactly on the host."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from mone_jax.errors import UserError
from mone_jax.model import MoEForCausalLM
from mone_jax.stats import LayerStats, Stats


@partial(jax.jit, static_argnums=0)
def _step(graphdef, state, ids, mask):
    """Batch statistics of every MoE layer; no logits are computed."""
    model = nnx.merge(graphdef, state)
    _, stats = model.hidden_states(ids, mask, collect=True)
    return stats, mask.sum(dtype=jnp.int32)


def _as_batch(b, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(b, dict):
        ids, mask = np.asarray(b["input_ids"]), b.get("attention_mask")
    else:
        ids, mask = np.asarray(b), None
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"calibration batches must be integer token ids [B, T], got {ids.dtype} {list(ids.shape)}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise UserError(f"calibration token ids must lie in [0, {vocab}), found {ids.min()}..{ids.max()}: "
                        "the data was tokenized for another model")
    mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    return ids.astype(np.int32), mask


def calibrate(model: MoEForCausalLM, batches: Iterable, *, progress: bool = True, total: int | None = None) -> Stats:
    """Run the (original) model over ``batches`` and return merged per-expert statistics.

    Each batch is int token ids [B, T] or a dict with ``input_ids`` and ``attention_mask``
    (0 = padding, counted nowhere). Equal batch shapes compile once.
    """
    for i, blk in model.moe_blocks().items():
        if blk.num_kept != model.config.num_experts:
            raise UserError(f"layer {i} is already pruned: calibrate the original model")
    cfg = model.config
    graphdef, state = nnx.split(model)
    acc = Stats({i: LayerStats.zeros(cfg.num_experts, cfg.hidden_size) for i in cfg.moe_layer_ids}, 0,
                {"model_type": cfg.model_type, "num_experts": cfg.num_experts, "top_k": cfg.top_k})
    pending = None  # fetch batch i's results while batch i+1 runs (async dispatch)
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    for b in tqdm(batches, desc="calibrating", unit="batch", disable=not progress, total=total):
        ids, mask = _as_batch(b, cfg.vocab_size)
        out = _step(graphdef, state, jnp.asarray(ids), jnp.asarray(mask))
        if pending is not None:
            acc = _fold(acc, pending)
        pending = out
    if pending is not None:
        acc = _fold(acc, pending)
    if acc.tokens == 0:
        raise UserError("calibration saw no (non-padding) tokens: give non-empty calibration data")
    acc.check_finite()
    return acc


def _fold(acc: Stats, out) -> Stats:
    stats, n = jax.device_get(out)
    batch = Stats({i: LayerStats.from_batch(s) for i, s in stats.items()}, int(n))
    return acc.merge(batch)
