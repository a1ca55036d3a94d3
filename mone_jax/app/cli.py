"""The ``mone-jax`` command line: a command runs (:mod:`mone_jax.app.commands`) and its failures become one
line and an exit code. The options are in :mod:`mone_jax.app.arguments`."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from mone_jax.app.arguments import build_parser, check_numbers
from mone_jax.base import phases
from mone_jax.base.errors import UserError


def main(argv: list[str] | None = None) -> int:
    """Run the command (``argv`` None: the process's command line, whose phase lines count from process
    start; else from this call); bad input: one line ``mone-jax: error: ...`` and exit code 2; the machine failing
    (disk full, out of memory): one line and exit code 1. ``--debug`` shows the traceback instead. What the
    command changes in the process (phase lines, warning display, environment) is restored when it returns."""
    since = phases.process_start() if argv is None else None  # the command line: stamps from process start
    args = build_parser().parse_args(argv)
    args.progress = not args.quiet and sys.stderr.isatty()  # bars only where a terminal redraws them
    with _session(args, since):
        try:
            check_numbers(args)
            from mone_jax.app.hub import resolve_models

            resolve_models(args)  # hub ids -> folders in the Hugging Face cache
            if getattr(args, "precheck", None):  # a command's checks that need no JAX
                args.precheck(args)
            return _run(args)
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


@contextmanager
def _session(args, since: float | None = None) -> Iterator[None]:
    """Phase lines and warnings (one line each unless ``--debug``) on stderr, none with ``--quiet`` (errors
    only), and the libraries' bars (off a terminal) and notices (``--quiet``) quieted through the environment,
    for the length of the command."""
    env = {"TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}  # e.g. "PyTorch was not found": not needed here
    if not args.progress:  # the libraries' progress bars only on a terminal (read when they are imported)
        env.update(HF_DATASETS_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if args.quiet:  # and their notices not with --quiet
        env.update(TRANSFORMERS_VERBOSITY="error")
    added = [k for k in env if k not in os.environ]
    os.environ.update({k: env[k] for k in added})
    try:
        with warnings.catch_warnings(), phases.configured(not args.quiet, since):
            if args.quiet:  # errors only
                warnings.simplefilter("ignore")
            elif not args.debug:
                warnings.showwarning = _warn
            yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _run(args) -> int:
    """The command's exit code; commands that compile use the persistent compilation cache, report their
    compile time and trace every matmul at ``--precision`` (resolved here from the compute dtype when not
    given: :func:`mone_jax.base.precision.default_for`)."""
    if args.cmd in ("inspect", "verify"):
        return args.run(args) or 0
    from mone_jax.base.compile_cache import CompileClock, configure
    from mone_jax.base.precision import default_for, matmul_precision

    configure(args.compile_cache)
    if getattr(args, "precision", None) is None:
        args.precision = default_for(getattr(args, "dtype", "float32"))
    with CompileClock() as clock, matmul_precision(args.precision):
        code = args.run(args) or 0
    phases.phase("done", clock.describe())
    return code


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
