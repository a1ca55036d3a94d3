"""What several commands share."""

from __future__ import annotations

from mone_jax.base.phases import phase


def load_model(args):
    """The model of ``args.model`` in ``args.dtype``."""
    from mone_jax.convert.load import load_hf

    phase("load", f"the model in '{args.model}' ({args.dtype})")
    return load_hf(args.model, dtype=args.dtype, progress=args.progress)
