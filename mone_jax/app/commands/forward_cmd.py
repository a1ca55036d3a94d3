"""``mone-jax forward``: logits for given token ids."""

from __future__ import annotations

import io

import numpy as np

from mone_jax.app.commands.common import load_model
from mone_jax.base.errors import UserError
from mone_jax.base.files import atomic_write
from mone_jax.base.tokens import token_ids


def run(args) -> None:
    from mone_jax.app.jobs import file_out
    from mone_jax.convert.load import config_of

    try:  # the inputs are checked before the model loads
        ids = np.load(args.tokens, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read token ids from '{args.tokens}' ({e}): give a .npy of int token ids") from None
    file_out(args.logits_out)
    ids = token_ids(ids, config_of(args.model).vocab_size, f"'{args.tokens}'")
    model = load_model(args)
    logits = np.asarray(model(ids), np.float32)
    atomic_write(args.logits_out, lambda tmp: tmp.write_bytes(_npy_bytes(logits)))
    print(f"wrote logits {list(logits.shape)} to {args.logits_out}")


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()
