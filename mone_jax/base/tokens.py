"""Token-id validation that every entry point shares."""

from __future__ import annotations

import numpy as np

from mone_jax.base.errors import UserError


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
