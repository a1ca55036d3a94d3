"""Calibration: one jitted, sharded step per batch; batch statistics merged exactly on the host.

The step runs under :func:`jax.shard_map` on a (data, expert) mesh (one device by default): batch
rows split over all devices, experts over ``expert``, each MoE block expert-parallel with its
statistics reduced inside the step (see :mod:`mone_jax.model.sharding`). Batch statistics are then Chan-merged in float64
on the host. With a :class:`~mone_jax.calib.resume.CalibCheckpoint` the running statistics and the
batch position are saved every few batches and a rerun resumes from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import lru_cache

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from mone_jax.base.config import ModelConfig
from mone_jax.base.errors import UserError
from mone_jax.base.phases import phase
from mone_jax.base.precision import current as current_precision
from mone_jax.base.stats import LayerStats, Stats, check_semantics
from mone_jax.base.tokens import token_ids
from mone_jax.calib.resume import CalibCheckpoint, DataDigest, check_digest
from mone_jax.model.causal_lm import MoEForCausalLM, attention_biases, capture_sown
from mone_jax.model.moe import EXPERT
from mone_jax.model.rope import rope_tables
from mone_jax.model.sharding import (
    batch_spec,
    global_batch,
    padded_rows,
    padded_state,
    param_specs,
    place,
    process_rows,
    single_device_mesh,
)


@lru_cache(maxsize=64)
def layer_step(graphdef, mesh: Mesh, spec_leaves: tuple, spec_def, num_experts: int, impl: str, block: int | None,
               windows: tuple):
    """Jitted (layer state, x, mask, tables) -> (layer output split like x, replicated LayerStats or None);
    ``tables`` from :func:`batch_tables` for the model's attention ``windows``.

    One ``shard_map`` over the mesh: every device runs attention and dense layers on its own rows
    only; an MoE block gathers rows over ``expert`` around its local experts. Cached by the layer's
    graphdef, so identical layers share one compiled program."""
    specs = jax.tree.unflatten(spec_def, spec_leaves)
    rows = batch_spec(mesh)

    def body(state, x, mask, cos, sin, biases):
        layer = nnx.merge(graphdef, state)
        y, stats = capture_sown(layer, x, cos, sin, dict(zip(windows, biases)), mask, impl, block)
        return y, next(iter(stats.values()), None)

    def step(state, x, mask, tables):
        cos, sin, biases = tables
        # check_vma=False: the dispatch internals (scan carries, switch branches) are not vma-annotated
        fn = jax.shard_map(body, mesh=mesh, in_specs=(specs, rows, rows, P(), P(), (rows,) * len(windows)),
                           out_specs=(rows, P(EXPERT)), check_vma=False)
        y, stats = fn(state, x, mask, cos, sin, biases)
        return y, jax.tree.map(lambda a: a[:num_experts], stats)  # padding expert rows dropped

    return jax.jit(step, out_shardings=(NamedSharding(mesh, rows), NamedSharding(mesh, P())))


@lru_cache(maxsize=16)
def batch_tables(mesh: Mesh, rope, dtype, windows: tuple):
    """Jitted mask [B, T] -> (cos, sin, attention biases [B, T, T] per window of ``windows``), made once per batch
    and shared by every layer (made inside each layer's program, XLA recomputes the bias in every attention chunk)."""
    rows = NamedSharding(mesh, batch_spec(mesh))
    rep = NamedSharding(mesh, P())

    def tables(mask):
        cos, sin = rope_tables(rope, mask.shape[1], dtype)
        biases = attention_biases(mask, set(windows))
        return cos, sin, tuple(biases[w] for w in windows)

    return jax.jit(tables, out_shardings=(rep, rep, (rows,) * len(windows)))


@lru_cache(maxsize=16)
def _embed_step(mesh: Mesh):
    """Jitted (table, ids) -> embeddings [B, T, d], rows split like the batch."""
    return jax.jit(lambda table, ids: table[ids], out_shardings=NamedSharding(mesh, batch_spec(mesh)))


def windows(cfg: ModelConfig) -> tuple:
    """The attention window sizes of the model's layers (None: full causal attention)."""
    return tuple(sorted(set(cfg.sliding_windows), key=lambda w: (w is not None, w or 0)))


def layer_programs(model: MoEForCausalLM, mesh: Mesh) -> tuple[jax.Array, list[tuple[int, Callable, nnx.State]]]:
    """The embedding table and (layer index, jitted step, placed state) of every decoder layer up to the last
    MoE layer (later layers cannot change the statistics), parameters padded and laid out on ``mesh``."""
    cfg = model.config
    _, state = nnx.split(model)
    state = padded_state(state, mesh)
    specs = param_specs(state)
    state = place(state, specs, mesh)
    out = []
    for i in range(max(cfg.moe_layer_ids) + 1):
        graphdef = nnx.graphdef(model.layers[i])
        leaves, treedef = jax.tree.flatten(specs["layers"][i])
        step = layer_step(graphdef, mesh, tuple(leaves), treedef, cfg.num_experts, model.impl, model.block,
                          windows(cfg))
        out.append((i, step, state["layers"][i]))
    return state["embed"][...], out


def run_layers(model: MoEForCausalLM, table: jax.Array, programs: list, ids: jax.Array, mask: jax.Array,
               mesh: Mesh) -> dict:
    """{moe layer: device LayerStats} of one global batch (dispatched asynchronously)."""
    x = _embed_step(mesh)(table, ids)
    tables = batch_tables(mesh, model.config.rope, model.dtype, windows(model.config))(mask)
    stats = {}
    for i, step, state in programs:
        x, s = step(state, x, mask, tables)
        if s is not None:
            stats[i] = s
    return stats


def as_batch(b, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [B, T], mask bool [B, T]) of a batch given as ids or {input_ids, attention_mask}."""
    if isinstance(b, dict):
        ids, mask = np.asarray(b["input_ids"]), b.get("attention_mask")
    else:
        ids, mask = np.asarray(b), None
    ids = token_ids(ids, vocab, "a calibration batch")
    mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask).astype(bool).reshape(ids.shape)
    return ids, mask


TOKENS_PER_DEVICE = 4096  # per data-parallel device and step: large matmuls, at most a few hundred MB of activations
ROWS_PER_EXPERT = 256  # routed rows per expert and step that keep its matmuls efficient


def default_batch_size(cfg: ModelConfig, seq_len: int, devices: int = 1, memory_bytes: float | None = None) -> int:
    """Sequences per calibration step chosen from the model: about 4096 tokens per device, or enough that an
    average expert sees 256 routed rows, whichever is more; at most what fits in a tenth of ``memory_bytes``
    (per device, after the weights) with an estimate of a layer's live activations; a multiple of ``devices``."""
    tokens = max(TOKENS_PER_DEVICE, -(-ROWS_PER_EXPERT * cfg.num_experts // cfg.top_k)) * devices
    seq_len = max(seq_len, 1)
    rows = max(1, -(-tokens // seq_len))
    if memory_bytes:
        per_token = 4 * (12 * cfg.hidden_size + cfg.num_experts + 8 * cfg.top_k + 2 * cfg.shared_expert_intermediate_size)
        rows = max(1, min(rows, int(0.1 * memory_bytes * devices // (per_token * seq_len))))
    return rows - rows % devices if rows >= devices else rows


def calibration_batches(ids: np.ndarray, batch_size: int) -> tuple[np.ndarray | dict, ...]:
    """``ids`` [N, T] cut into batches of ``batch_size`` rows; a short last batch (when there are several) is
    padded with masked rows to the same shape, so every sample counts and one compiled step serves all."""
    out: list[np.ndarray | dict] = [ids[i:i + batch_size] for i in range(0, ids.shape[0], batch_size)]
    short = out[-1].shape[0] if out else batch_size
    if len(out) > 1 and short < batch_size:
        pad = np.zeros((batch_size, ids.shape[1]), ids.dtype)
        pad[:short] = out[-1]
        mask = np.zeros(pad.shape, np.int32)
        mask[:short] = 1
        out[-1] = {"input_ids": pad, "attention_mask": mask}
    return tuple(out)


def shard_batch(a: np.ndarray, mesh: Mesh) -> jax.Array:
    """Global batch ``a`` [B, ...] padded with zero rows to a multiple of the data axis and split over it;
    this process reads and sends only its own rows."""
    rows = padded_rows(a.shape[0], mesh)
    lo, hi = process_rows(mesh, rows)
    local = np.zeros((hi - lo, *a.shape[1:]), a.dtype)
    take = a[lo:min(hi, a.shape[0])]
    local[:take.shape[0]] = take
    return global_batch(local, mesh, rows)


def empty_stats(cfg) -> Stats:
    return Stats({i: LayerStats.zeros(cfg.num_experts, cfg.hidden_size) for i in cfg.moe_layer_ids}, 0,
                 {"model_type": cfg.model_type, "num_experts": cfg.num_experts, "top_k": cfg.top_k})


def identity(cfg, mode: str, dtype: str = "float32", precision: str | None = None) -> dict:
    """What a checkpoint must agree on to be resumed: model, mode (full / sequential), compute dtype and
    matmul precision (default: the one in effect, :mod:`mone_jax.base.precision`; ``default`` is left out, as
    checkpoints written before the option carry none)."""
    precision = precision or current_precision()
    return {"mode": mode, "dtype": str(dtype), "model_type": cfg.model_type, "num_layers": cfg.num_layers,
            "num_experts": cfg.num_experts, "hidden": cfg.hidden_size,
            **({} if precision == "default" else {"precision": precision})}


def calibrate(model: MoEForCausalLM, batches: Iterable, *, mesh: Mesh | None = None, progress: bool = True,
              total: int | None = None, checkpoint: CalibCheckpoint | None = None, semantics: str = "exact") -> Stats:
    """Run the (original) model over ``batches`` and return merged per-expert statistics.

    Each batch is int token ids [B, T] or a dict with ``input_ids`` and ``attention_mask``
    (0 = padding, counted nowhere). Equal batch shapes compile once. ``mesh`` (see
    :mod:`mone_jax.model.sharding`) spreads experts and rows over devices; batches are padded to a
    multiple of its data axis with masked rows. Under ``jax.distributed`` every process passes
    the same global batches and gets the same statistics. ``semantics="reference"`` marks the result for
    reference-semantics planning (its ``ref_*`` fields: one batch is one call of the reference).
    """
    check_semantics(semantics)
    for i, blk in model.moe_blocks().items():
        if blk.num_kept != model.config.num_experts:
            raise UserError(f"layer {i} is already pruned: calibrate the original model")
    cfg = model.config
    mesh = mesh or single_device_mesh()
    table, programs = layer_programs(model, mesh)
    acc, start, digest = empty_stats(cfg), 0, DataDigest()
    if checkpoint is not None and (found := checkpoint.restore(acc)) is not None:
        acc, position, expected = found
        start = position["batch"]
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    pending, seen, bar = None, 0, None  # fetch batch k's results while batch k+1 runs (async dispatch)
    for b in batches:
        ids, mask = as_batch(b, cfg.vocab_size)
        digest.update(ids, mask)
        seen += 1
        if seen <= start:
            if seen == start:
                check_digest(checkpoint.directory, expected, digest.hexdigest())
            continue
        if bar is None:
            phase("compile", "the calibration step (once per layer kind and batch shape)")
        out = run_layers(model, table, programs, shard_batch(ids, mesh), shard_batch(mask, mesh), mesh), int(mask.sum())
        if bar is None:  # started after compilation: its rate is the real one
            phase("calibrate", f"{total if total is not None else 'all'} batch{'' if total == 1 else 'es'} of {ids.shape[0]} x {ids.shape[1]} "
                               "tokens")
            bar = tqdm(desc="calibrating", unit="batch", disable=not progress, total=total, initial=seen - 1)
        bar.update(1)
        if pending is not None:
            acc = _fold(acc, *pending, checkpoint)
        pending = (out, seen, digest.hexdigest())
    if bar is not None:
        bar.close()
    if seen < start:
        check_digest(checkpoint.directory, expected, "")
    if pending is not None:
        acc = _fold(acc, *pending, checkpoint, last=True)
    if acc.tokens == 0:
        raise UserError("calibration saw no (non-padding) tokens: give non-empty calibration data")
    acc.check_finite()
    acc.meta["semantics"] = semantics
    acc.meta["precision"] = current_precision()  # the matmul precision the statistics were computed at
    return acc


def _fold(acc: Stats, out, position: int, digest: str, checkpoint: CalibCheckpoint | None, last: bool = False) -> Stats:
    stats, n = out
    stats = jax.device_get(stats)
    acc = acc.merge(Stats({i: LayerStats.from_batch(s) for i, s in stats.items()}, n))
    if checkpoint is not None and (last or position % checkpoint.every == 0):
        checkpoint.save(acc, {"batch": position}, digest)
    return acc
