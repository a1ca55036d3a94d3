"""The ``mone-jax`` command line: a command runs (:mod:`mone_jax.app.commands`) and its failures become one
line and an exit code. The options are in :mod:`mone_jax.app.arguments`."""

from __future__ import annotations

import os
import sys
import warnings

from mone_jax.app.arguments import build_parser, check_numbers
from mone_jax.base.errors import UserError
from mone_jax.base.phases import configure, phase


def main(argv: list[str] | None = None) -> int:
    """Run the command; bad input: one line ``mone-jax: error: ...`` and exit code 2; the machine failing
    (disk full, out of memory): one line and exit code 1. ``--debug`` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # e.g. "PyTorch was not found": not needed here
    configure(not args.quiet)  # phase lines on stderr; bars only where a terminal redraws them
    args.progress = not args.quiet and sys.stderr.isatty()
    if not args.debug:
        warnings.showwarning = _warn
    if getattr(args, "quiet", False):  # the libraries' progress bars and notices too
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        check_numbers(args)
        clock = _compile_cache(args)
        code = args.run(args) or 0
        if clock is not None:
            phase("done", clock.describe())
    except UserError as e:
        if args.debug:
            raise
        print(f"mone-jax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mone-jax: interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError, RuntimeError) as e:
        if args.debug or (isinstance(e, RuntimeError) and "RESOURCE_EXHAUSTED" not in str(e)):
            raise
        print(f"mone-jax: error: {_failure(e)}", file=sys.stderr)
        return 1
    return code


def _compile_cache(args):
    """The persistent compilation cache configured for a command that compiles; its compile clock started."""
    if args.cmd in ("inspect", "verify"):
        return None
    from mone_jax.base.compile_cache import CLOCK, configure

    configure(args.compile_cache)
    return CLOCK.start()


def _warn(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"mone-jax: warning: {message}", file=sys.stderr)


def _failure(e: BaseException) -> str:
    """One line for an error of the machine rather than of the input."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}{f': {e.filename}' if e.filename else ''} (disk full, file size limit or permissions?)"
    if isinstance(e, OSError):
        return str(e)
    return "out of memory: lower --batch-size or --seq-len, or spread the model with --mesh or --sequential"


if __name__ == "__main__":
    sys.exit(main())
