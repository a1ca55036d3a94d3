"""Phase lines: what a long run is doing, from its first second (load, data, compile, calibrate, plan, export).

The command line turns them on (``--quiet`` leaves them off, as the Python API does): one line on stderr
when a phase starts, with the seconds since the run began, e.g. ``mone-jax: [3.1s] compile: the
calibration step (once per batch shape)``. Progress bars then show rates within a phase only, so a bar
started after compilation reports the real rate. A command adopts them with one call per phase::

    from mone_jax.base.phases import phase
    phase("export", f"writing {out}")
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

_on = False
_start = time.monotonic()


def configure(on: bool) -> None:
    """Turn phase lines on or off; the clock of the run starts now."""
    global _on, _start
    _on, _start = on, time.monotonic()


@contextmanager
def configured(on: bool) -> Iterator[None]:
    """:func:`configure` for the length of a block (a command); then as before."""
    global _on, _start
    before = _on, _start
    configure(on)
    try:
        yield
    finally:
        _on, _start = before


@contextmanager
def silenced() -> Iterator[None]:
    """No phase lines for the length of a block (steps repeated many times under one progress bar)."""
    global _on
    before, _on = _on, False
    try:
        yield
    finally:
        _on = before


def enabled() -> bool:
    return _on


def phase(name: str, what: str) -> None:
    """Say that phase ``name`` starts and what it does (nothing when phase lines are off)."""
    if _on:
        print(f"mone-jax: [{time.monotonic() - _start:.1f}s] {name}: {what}", file=sys.stderr, flush=True)
