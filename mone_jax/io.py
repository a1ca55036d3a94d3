"""Two checks-and-writes every entry point shares: atomic file writes and token-id validation."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mone_jax.errors import UserError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a hidden sibling of ``path``, then rename it into place: readers see the old
    file or the complete new one, and a failed write leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def token_ids(ids, vocab_size: int | None, source: str = "the data") -> np.ndarray:
    """``ids`` as int32 [N, T] (a 1-D array is one row) after checking that they are integers, non-empty
    and inside [0, vocab_size); UserError naming ``source`` otherwise."""
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
        raise UserError(f"{source} must hold non-empty integer token ids [N, T], got {ids.dtype} {list(ids.shape)}")
    low, high = int(ids.min()), int(ids.max())
    limit = vocab_size if vocab_size is not None else np.iinfo(np.int32).max + 1
    if low < 0 or high >= limit:
        raise UserError(f"{source}: token ids must lie in [0, {limit}), found {low}..{high}: make the data with "
                        "this model's tokenizer")
    return ids.astype(np.int32)
