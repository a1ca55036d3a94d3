"""Persistent XLA compilation cache (on by default in the command line) and compile-time accounting.

A rerun with the same shapes loads its programs from the cache instead of compiling them. The cache
folder is, in order: the ``--compile-cache`` option, the environment variable ``MONE_JAX_COMPILE_CACHE``,
JAX's own ``JAX_COMPILATION_CACHE_DIR``, or ``$XDG_CACHE_HOME/mone-jax/xla`` (``~/.cache/mone-jax/xla``);
``off`` disables it. The Python API leaves JAX's configuration alone unless :func:`configure` is called.

:class:`CompileClock` sums the seconds JAX spends tracing, lowering and compiling (or loading from the
cache), so that progress lines and benchmarks report compilation apart from the work.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import jax

ENV = "MONE_JAX_COMPILE_CACHE"
OFF = ("off", "none", "0", "false", "")
MAX_BYTES = 4 * 2**30  # least-recently-used entries are evicted beyond this
MIN_COMPILE_SECS = 0.2  # programs compiled faster than this are not worth a file (default)
MIN_ENV = "MONE_JAX_COMPILE_CACHE_MIN_SECS"  # another threshold, in seconds

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mone-jax" / "xla"


def resolve(option: str | None = None) -> Path | None:
    """The cache folder chosen by ``option``, the environment or the default; None when turned off."""
    for value in (option, os.environ.get(ENV), os.environ.get("JAX_COMPILATION_CACHE_DIR")):
        if value is not None:
            return None if value.strip().lower() in OFF else Path(value).expanduser()
    return default_dir()


def configure(option: str | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at :func:`resolve`'s folder (or turn it off) and return it.
    A folder that cannot be created is reported in a warning and the run goes on without a cache."""
    from jax.experimental.compilation_cache import compilation_cache

    path = resolve(option)
    if path is not None:
        try:
            path.mkdir(parents=True, exist_ok=True)
            if not os.access(path, os.W_OK):
                raise PermissionError(f"'{path}' is not writable")
        except OSError as e:
            warnings.warn(f"compilation cache disabled ({e}); set --compile-cache DIR or {ENV}=off", stacklevel=2)
            path = None
    jax.config.update("jax_compilation_cache_dir", None if path is None else str(path))
    if path is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ.get(MIN_ENV, MIN_COMPILE_SECS)))
        if jax.config.jax_compilation_cache_max_size == -1 and importlib.util.find_spec("filelock"):
            jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)  # LRU eviction needs file locks
    compilation_cache.reset_cache()  # taken into account even when something compiled before
    return path


class CompileClock:
    """Seconds spent tracing, lowering and compiling (or loading from the cache), how many programs were
    compiled and how many came from the persistent cache, while it runs: ``with CompileClock() as clock:``
    or :meth:`start` ... :meth:`stop`. A fresh clock per run starts at zero."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.programs = 0
        self.cache_hits = 0
        self._on = False

    def _duration(self, event: str, duration: float, **_) -> None:
        if event in _COMPILE_EVENTS:
            self.seconds += duration
            self.programs += event == _COMPILE_EVENTS[-1]

    def _event(self, event: str, **_) -> None:
        self.cache_hits += event == "/jax/compilation_cache/cache_hits"

    def start(self) -> CompileClock:
        if not self._on:
            jax.monitoring.register_event_duration_secs_listener(self._duration)
            jax.monitoring.register_event_listener(self._event)
            self._on = True
        return self

    def stop(self) -> None:
        if self._on:
            jax.monitoring.unregister_event_duration_listener(self._duration)
            jax.monitoring.unregister_event_listener(self._event)
            self._on = False

    def __enter__(self) -> CompileClock:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def describe(self) -> str:
        cached = f", {self.cache_hits} from the cache" if self.cache_hits else ""
        return f"{self.seconds:.1f} s compiling {self.programs} program{'s' * (self.programs != 1)}{cached}"
