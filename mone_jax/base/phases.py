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
_start = _imported = time.monotonic()


def configure(on: bool, since: float | None = None) -> None:
    """Turn phase lines on or off; the clock of the run starts at ``since`` (a :func:`time.monotonic` time,
    e.g. :func:`process_start`), default now."""
    global _on, _start
    _on, _start = on, time.monotonic() if since is None else since


@contextmanager
def configured(on: bool, since: float | None = None) -> Iterator[None]:
    """:func:`configure` for the length of a block (a command); then as before."""
    global _on, _start
    before = _on, _start
    configure(on, since)
    try:
        yield
    finally:
        _on, _start = before


def process_start() -> float:
    """When this process started, on the :func:`time.monotonic` clock (Linux: from /proc; elsewhere: when this
    module was imported), so that the first line's stamp includes the seconds spent importing."""
    import os

    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _imported
    return time.monotonic() - age if 0 <= age < time.monotonic() - _imported + 3600 else _imported


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


class Steps:
    """Progress over ``total`` steps of phase ``name``: a tqdm bar when ``bar`` (a terminal redraws it), else one
    phase line per step (at most one per ``every`` seconds, and the last) with steps done / total and the ETA::

        steps = Steps("compare", 21, "plans", bar=args.progress)
        steps.step("substitute 0.25 frequency")   # mone-jax: [9.2s] compare: 1/21 plans (...), ETA 40 s
        steps.close()
    """

    def __init__(self, name: str, total: int, unit: str, *, bar: bool, every: float = 0.0) -> None:
        from tqdm.auto import tqdm

        self.name, self.total, self.unit, self.every = name, total, unit, every
        self.done, self._t0, self._last = 0, time.monotonic(), -float("inf")
        self._bar = tqdm(total=total, desc=name, unit=unit.rstrip("s") or unit) if bar else None

    def step(self, what: str = "", n: int = 1) -> None:
        """``n`` more steps done (``what``: the last of them, in a word or two)."""
        self.done += n
        if self._bar is not None:
            if what:
                self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last < self.every and self.done < self.total:
            return
        self._last = now
        left = (now - self._t0) / self.done * (self.total - self.done)
        eta = f", ETA {eta_text(left)}" if self.done < self.total else ""
        phase(self.name, f"{self.done}/{self.total} {self.unit}{f' ({what})' if what else ''}{eta}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def eta_text(seconds: float) -> str:
    """``42 s``, ``3 min 5 s`` or ``2 h 10 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"
