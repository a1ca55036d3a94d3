"""``mone-jax diff``: the logits (and per-layer outputs) of two checkpoints compared, or of one in JAX and in
transformers (``--vs-torch``)."""

from __future__ import annotations

import json
import sys

from mone_jax.base.errors import UserError


def run(args) -> int:
    """Exit code 1 when the logits differ by more than ``--tol``."""
    from mone_jax.app.diff import compare, table, token_ids_for
    from mone_jax.convert.load import config_of

    if args.tokens is not None and args.text is not None:
        raise UserError("give --tokens or --text, not both")
    if args.tol is not None and args.tol < 0:
        raise UserError(f"--tol must be >= 0, got {args.tol}")
    ids = token_ids_for(args.model, args.tokens, args.text, config_of(args.model).vocab_size)
    report = compare(args.model, args.other, ids, vs_torch=args.vs_torch, dtype=args.dtype)
    failed = args.tol is not None and report["logits"]["max_abs"] > args.tol
    report["tol"], report["passed"] = args.tol, not failed
    print(json.dumps(report, indent=1) if args.json else table(report))
    if failed:
        print(f"mone-jax: logits differ by {report['logits']['max_abs']:.3g} > --tol {args.tol}", file=sys.stderr)
    return 1 if failed else 0
