"""Layer-streaming calibration (``--sequential``) for models larger than memory, and its export.

Never more than one decoder layer's weights are resident: the embeddings of the calibration
tokens are gathered row by row from the checkpoint, then each layer is read from safetensors,
placed on the mesh, run over every batch (its statistics collected as in the full model), and
freed. Hidden states live between layers in host RAM, or in a memory-mapped file under
``offload_dir``. Each process keeps only the rows of its own devices.

With a :class:`~mone_jax.calib.resume.CalibCheckpoint` two hidden-state files alternate (a layer reads
one and writes the other), so a killed run resumes inside a layer: the position is (layer,
batch), the files live in ``offload_dir`` or else in the checkpoint folder.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from mone_jax.base.errors import UserError
from mone_jax.base.precision import current as current_precision
from mone_jax.base.stats import LayerStats, Stats
from mone_jax.calib.calibration import as_batch, batch_tables, empty_stats, layer_step, shard_batch, windows
from mone_jax.calib.resume import CalibCheckpoint, DataDigest, check_digest
from mone_jax.convert.load import config_of, load_layer, refuse_pruned, resolve_dtype
from mone_jax.convert.reader import CheckpointReader
from mone_jax.model.moe import default_impl
from mone_jax.model.sharding import (
    global_batch,
    local_rows,
    padded_rows,
    param_specs,
    process_rows,
    single_device_mesh,
)

EMBED = "model.embed_tokens.weight"


class _Hidden:
    """Per-batch hidden states [rows, T, d] of this process: RAM, one memory-mapped file, or (resumable)
    two files that layers alternate between."""

    def __init__(self, shapes: list[tuple], dtype, directory: Path | None, persistent: bool):
        self.shapes, self.dtype = shapes, np.dtype(dtype)
        total = sum(int(np.prod(s)) for s in shapes)
        if directory is None:
            self._bufs = [[np.empty(s, dtype) for s in shapes]]
            return
        directory.mkdir(parents=True, exist_ok=True)
        self._bufs = []
        for k in range(2 if persistent else 1):
            path = directory / f"hidden.{k}.p{jax.process_index()}.bin"
            fresh = not persistent or not path.is_file() or path.stat().st_size != total * self.dtype.itemsize
            mm = np.memmap(path, self.dtype, "w+" if fresh else "r+", shape=(total,))
            if not persistent:
                path.unlink()  # the mapping stays valid; the file goes when it is closed
            self._bufs.append(self._views(mm))

    def _views(self, flat: np.ndarray) -> list[np.ndarray]:
        out, off = [], 0
        for s in self.shapes:
            n = int(np.prod(s))
            out.append(flat[off:off + n].reshape(s))
            off += n
        return out

    def src(self, layer: int) -> list[np.ndarray]:
        return self._bufs[layer % len(self._bufs)]

    def dst(self, layer: int) -> list[np.ndarray]:
        return self._bufs[(layer + 1) % len(self._bufs)]

    def flush(self) -> None:
        for bufs in self._bufs:
            if bufs and isinstance(bufs[0].base, np.memmap):
                bufs[0].base.flush()


def calibrate_sequential(folder: str | Path, batches: Iterable, *, dtype="float32", mesh: Mesh | None = None,
                         offload_dir: str | Path | None = None, progress: bool = True,
                         checkpoint: CalibCheckpoint | None = None, impl: str | None = None,
                         block: int | None = None) -> Stats:
    """Per-expert statistics of the Hugging Face model in ``folder``, streaming one layer at a time.

    Same batches, dtype, ``impl`` and ``block`` give the same statistics as
    :func:`~mone_jax.calib.calibration.calibrate` on the loaded model.
    """
    cfg = config_of(folder)
    refuse_pruned(folder)
    dt = resolve_dtype(dtype)
    mesh = mesh or single_device_mesh()
    impl = impl or default_impl()
    data = [as_batch(b, cfg.vocab_size) for b in batches]
    if not data:
        raise UserError("calibration saw no (non-padding) tokens: give non-empty calibration data")
    rows = [padded_rows(ids.shape[0], mesh) for ids, _ in data]
    spans = [process_rows(mesh, r) for r in rows]
    shapes = [(hi - lo, ids.shape[1], cfg.hidden_size) for (lo, hi), (ids, _) in zip(spans, data)]
    if checkpoint is not None and not offload_dir and "://" in str(checkpoint.directory):
        raise UserError("--sequential keeps its hidden-state files next to the checkpoint, which must then be on "
                        "a local disk: give --offload-dir as well")
    directory = Path(offload_dir or checkpoint.directory) if offload_dir or checkpoint else None
    hidden = _Hidden(shapes, dt, directory, persistent=checkpoint is not None)
    masks = [shard_batch(mask, mesh) for _, mask in data]

    acc = empty_stats(cfg)
    acc.tokens = int(sum(int(mask.sum()) for _, mask in data))
    consumed = DataDigest()
    for ids, mask in data:
        consumed.update(ids, mask)
    start_layer, start_batch, digest = 0, 0, consumed.hexdigest()
    if checkpoint is not None and (found := checkpoint.restore(acc)) is not None:
        acc, position, expected = found
        check_digest(checkpoint.directory, expected, digest)
        start_layer, start_batch = position["layer"], position["batch"]
    if start_layer == 0 and start_batch == 0:
        _embed(folder, data, spans, hidden.src(0), dt)
    run = _Run(acc, hidden, spans, checkpoint, digest, len(data))
    bar = tqdm(total=cfg.num_layers * run.nb, initial=start_layer * run.nb + start_batch, desc="calibrating layers",
               unit="batch", disable=not progress)
    for i in range(start_layer, cfg.num_layers):
        release_memory()
        with CheckpointReader(folder) as reader:  # reopened per layer: its pages leave memory with it
            layer = load_layer(reader, cfg, i, dt, mesh=mesh)  # placed shard by shard, expert stacks padded
        graphdef, state = nnx.split(layer)
        specs = param_specs(state)
        del layer
        leaves, treedef = jax.tree.flatten(specs)
        step = layer_step(graphdef, mesh, tuple(leaves), treedef, cfg.num_experts, impl, block, windows(cfg))
        tables = batch_tables(mesh, cfg.rope, dt, windows(cfg))
        src = hidden.src(i)
        first = start_batch if i == start_layer else 0
        pending = None  # fetch batch b's output while batch b+1 runs
        for b in range(first, run.nb):
            out = step(state, global_batch(src[b], mesh, rows[b]), masks[b], tables(masks[b]))
            if pending is not None:
                run.fold(i, *pending)
            pending = (b, out)
        if pending is not None:
            run.fold(i, *pending)
        del state, pending
        bar.update(run.nb - first)
    bar.close()
    run.acc.check_finite()
    run.acc.meta["precision"] = current_precision()  # the matmul precision the statistics were computed at
    return run.acc


def release_memory() -> None:
    """Free dropped arrays now and hand freed heap pages back to the OS (glibc keeps them otherwise),
    so that resident memory follows the one layer in use."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _embed(folder, data, spans, out: list[np.ndarray], dt) -> None:
    """Embeddings of this process's rows, read row by row from the checkpoint (never the whole table)."""
    with CheckpointReader(folder) as reader:
        for (ids, _), (lo, hi), buf in zip(data, spans, out):
            local = np.zeros((hi - lo, ids.shape[1]), np.int32)
            take = ids[lo:min(hi, ids.shape[0])]
            local[:take.shape[0]] = take
            uniq, inv = np.unique(local, return_inverse=True)
            rows = reader.get_slice(EMBED, uniq)
            if rows.dtype.kind not in "fV":
                rows = rows.astype(np.float32)
            buf[...] = np.asarray(jnp.asarray(rows, dt))[inv.reshape(local.shape)]


@dataclass
class _Run:
    """Running statistics of a sequential pass, and where its layer outputs and checkpoints go."""

    acc: Stats
    hidden: _Hidden
    spans: list[tuple[int, int]]
    checkpoint: CalibCheckpoint | None
    digest: str
    nb: int

    def fold(self, layer: int, b: int, out) -> None:
        """Write batch b's layer output to the host buffer, merge its statistics, checkpoint when due."""
        y, stats = out
        self.hidden.dst(layer)[b][...] = local_rows(y, *self.spans[b])
        if stats is not None:
            self.acc.layers[layer] = self.acc.layers[layer].merge(LayerStats.from_batch(jax.device_get(stats)))
        last = b + 1 == self.nb
        if self.checkpoint is not None and ((layer * self.nb + b + 1) % self.checkpoint.every == 0 or last):
            self.hidden.flush()
            position = {"layer": layer + 1, "batch": 0} if last else {"layer": layer, "batch": b + 1}
            self.checkpoint.save(self.acc, position, self.digest)
