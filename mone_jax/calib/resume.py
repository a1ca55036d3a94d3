"""Resumable calibration: running statistics and the data position saved with orbax.

The running statistics are kept in float64 on the host and saved exactly, so a run resumed after
a kill folds the remaining batches into the same numbers and ends with the same statistics file
as an uninterrupted run. A running SHA-256 of the consumed batches guards against resuming with
other calibration data.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import jax
import numpy as np
from etils import epath

from mone_jax.base.errors import UserError
from mone_jax.base.stats import NAMES, LayerStats, Stats


class DataDigest:
    """Running SHA-256 over calibration batches (token ids and masks)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, *arrays: np.ndarray) -> None:
        for a in arrays:
            a = np.ascontiguousarray(a)
            self._h.update(f"{a.dtype}{a.shape}".encode())
            self._h.update(a.tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _tree(stats: Stats) -> dict:
    layers = {str(i): {f: np.asarray(getattr(s, f)) for f in NAMES} for i, s in stats.layers.items()}
    return {"tokens": np.asarray(stats.tokens, np.int64), "layers": layers}


def _stats(tree: dict, meta: dict) -> Stats:
    layers = {int(i): LayerStats(**{f: np.asarray(v[f]) for f in NAMES}) for i, v in tree["layers"].items()}
    return Stats(layers, int(tree["tokens"]), meta)


class CalibCheckpoint:
    """Saves (statistics, position) every ``every`` batches into ``directory``; restores the latest.

    ``identity`` (plain JSON data: model and mode) must match on restore. ``position`` is any
    JSON dict the caller uses to find where to go on (e.g. ``{"batch": k}``).
    """

    def __init__(self, directory: str | Path, every: int, identity: dict):
        if every < 1:
            raise UserError(f"--checkpoint-every must be a positive number of batches, got {every}")
        d = str(directory)
        self.directory = epath.Path(d if "://" in d else Path(d).resolve())  # local, or gs:// for pods
        self.every = every
        self.identity = identity
        import orbax.checkpoint as ocp  # imported on use: it is heavy

        self._ocp = ocp
        self._mngr = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False))
        self._step = self._mngr.latest_step() or 0

    def restore(self, like: Stats) -> tuple[Stats, dict, str] | None:
        """(statistics, position, data digest) of the latest checkpoint, or None when there is none."""
        if not self._step:
            return None
        ocp = self._ocp
        tree = _tree(like)
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        try:
            out = self._mngr.restore(self._step, args=ocp.args.Composite(
                stats=ocp.args.PyTreeRestore(item=tree, restore_args=args), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise UserError(f"the checkpoint in '{self.directory}' cannot be read ({e}): remove it to start over") \
                from None
        meta = out["meta"]
        if meta.get("identity") != self.identity:
            raise UserError(f"the checkpoint in '{self.directory}' belongs to another run ({meta.get('identity')}): "
                            "remove it or choose another --checkpoint-dir")
        print(f"resuming from the checkpoint in {self.directory} at {meta['position']}", file=sys.stderr)
        return _stats(out["stats"], like.meta), meta["position"], meta["digest"]

    def save(self, stats: Stats, position: dict, digest: str) -> None:
        ocp = self._ocp
        self._step += 1
        meta = {"identity": self.identity, "position": position, "digest": digest}
        self._mngr.save(self._step, args=ocp.args.Composite(stats=ocp.args.PyTreeSave(_tree(stats)),
                                                            meta=ocp.args.JsonSave(meta)))

    def close(self) -> None:
        self._mngr.close()


def remove_checkpoint(directory: str | Path, offload_dir: str | Path | None = None) -> None:
    """After a finished run: the checkpoint steps and the hidden-state files of :mod:`mone_jax.app.sequential` go, and
    the checkpoint folder too when nothing else is left in it, so that a rerun starts afresh instead of "resuming" a finished
    run. Files of others in these folders stay."""
    d = str(directory)
    ck = epath.Path(d if "://" in d else Path(d).resolve())
    if ck.exists():
        for p in ck.iterdir():
            if (p.name.isdigit() or ".orbax-checkpoint-tmp" in p.name) and p.is_dir():
                p.rmtree()
    for folder in {d, *([str(offload_dir)] if offload_dir else [])}:
        if "://" not in folder:
            for p in Path(folder).glob(f"hidden.[01].p{jax.process_index()}.bin"):
                p.unlink()
    if "://" not in d and Path(d).is_dir() and not any(Path(d).iterdir()):
        Path(d).rmdir()


def check_digest(directory: Path, expected: str, got: str) -> None:
    """UserError when the batches replayed on resume are not those the checkpoint consumed."""
    if expected != got:
        raise UserError(f"the checkpoint in '{directory}' was written for other calibration data: "
                        "resume with the same command, or remove the checkpoint to start over")
