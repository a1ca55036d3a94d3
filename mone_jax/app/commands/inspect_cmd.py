"""``mone-jax inspect``: family, layers, experts and parameter counts of a checkpoint."""

from __future__ import annotations


def run(args) -> None:
    from mone_jax.app.describe import describe

    print(describe(args.model, as_json=args.json))
