"""Atomic writes of a file or a folder: readers see the old one or the complete new one, never a part."""

from __future__ import annotations

import glob
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
_HOST = socket.gethostname()  # temporary siblings are named .<name>.<tmp|old|part>-<host>-<pid>


def _sibling(path: Path, kind: str, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{kind}-{_HOST}-{os.getpid()}{suffix}")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a hidden sibling of ``path``, then rename it into place: readers see the old
    file or the complete new one, and a failed write leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp", path.suffix)
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def part_folder(path: str | Path) -> Path:
    """A new hidden sibling folder of ``path`` for this process's part of a folder several processes write (what
    killed writes from this host left behind is removed first); the caller removes it."""
    path = Path(path)
    _clean_stale(path)
    part = _sibling(path, "part")
    shutil.rmtree(part, ignore_errors=True)
    return part


def atomic_write_folder(path: str | Path, write: Callable[[Path], T]) -> T:
    """``write(tmp)`` into a new hidden sibling folder of ``path``, then rename it into place, replacing an
    existing ``path`` only at the very end; ``write``'s result. A failed write leaves nothing behind, and what
    killed writes to ``path`` from this host left behind is removed first."""
    path = Path(path)
    _clean_stale(path)
    tmp = _sibling(path, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        result = write(tmp)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out``, replacing an existing ``out`` only at the very end."""
    old = _sibling(out, "old")
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _clean_stale(out: Path) -> None:
    """Remove what killed folder writes to ``out`` from this host left behind: temporary folders of dead
    processes, and the set-aside previous ``out`` (put back when the kill came before the new one was moved
    into place)."""
    for kind in ("tmp", "old", "part"):
        prefix = f".{out.name}.{kind}-{_HOST}-"
        for path in out.parent.glob(glob.escape(prefix) + "*"):
            pid = path.name[len(prefix):]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not out.exists():
                path.rename(out)
            else:
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True
