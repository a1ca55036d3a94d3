"""``mone-jax verify``: an exported folder checked against its sha256 manifest."""

from __future__ import annotations

import sys

from mone_jax.base.errors import UserError


def run(args) -> None:
    from mone_jax.convert.writer import verify_export

    problems = verify_export(args.folder)
    if len(problems) == 1:
        raise UserError(f"'{args.folder}' failed verification: {problems[0]}")
    if problems:  # every problem, one per line, then the verdict
        print("\n".join(f"  {p}" for p in problems), file=sys.stderr)
        raise UserError(f"'{args.folder}' failed verification: the {len(problems)} problems above; re-export it")
    print(f"{args.folder}: all files match the manifest")
