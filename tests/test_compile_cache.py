"""The persistent compilation cache (issue 17): where it lives, that a rerun loads its programs from it
instead of compiling them, that it changes no result, and that it can be turned off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mone_jax.base import compile_cache
from mone_jax.base.stats import Stats


@pytest.mark.parametrize("option,env,want", [
    ("/a", {"MONE_JAX_COMPILE_CACHE": "/b", "JAX_COMPILATION_CACHE_DIR": "/c"}, "/a"),
    (None, {"MONE_JAX_COMPILE_CACHE": "/b", "JAX_COMPILATION_CACHE_DIR": "/c"}, "/b"),
    (None, {"JAX_COMPILATION_CACHE_DIR": "/c"}, "/c"),
    (None, {"XDG_CACHE_HOME": "/x"}, "/x/mone-jax/xla"),
    ("off", {"MONE_JAX_COMPILE_CACHE": "/b"}, None),
    (None, {"MONE_JAX_COMPILE_CACHE": "OFF"}, None),
])
def test_cache_folder_precedence(monkeypatch, option, env, want):
    for k in ("MONE_JAX_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    got = compile_cache.resolve(option)
    assert (None if got is None else str(got)) == want


def _calibrate(model: str, ids: Path, out: Path, *extra: str, env: dict | None = None) -> str:
    """stderr of a fresh `mone-jax calibrate` process (its phase lines)."""
    env = {**os.environ, **(env or {})}
    env.pop("MONE_JAX_COMPILE_CACHE", None)  # the session's test cache (conftest) must not answer here
    env["MONE_JAX_COMPILE_CACHE_MIN_SECS"] = "0"  # the tiny model's programs compile in well under a second
    p = subprocess.run([sys.executable, "-m", "mone_jax.app.cli", "calibrate", model, "--calib", str(ids),
                        "--stats-out", str(out), *extra], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    return p.stderr


def _done(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if "] done: " in line)


@pytest.mark.slow
def test_rerun_loads_programs_from_the_cache(hf_models, tmp_path):
    """Two identical runs in fresh processes: the first compiles and fills the folder, the second loads every
    calibration program from it (JAX's own cache-hit events) and writes identical statistics."""
    model = str(hf_models("olmoe", "a")[0])
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 96, (6, 16)).astype(np.int32))
    cache = tmp_path / "xla"
    first = _calibrate(model, ids, tmp_path / "a.safetensors", "--compile-cache", str(cache))
    assert "from the cache" not in _done(first)
    assert any(cache.iterdir())
    again = _calibrate(model, ids, tmp_path / "b.safetensors", "--compile-cache", str(cache))
    hits = int(_done(again).split(", ")[-1].split()[0])
    assert hits >= 1, again
    a, b = Stats.load(tmp_path / "a.safetensors"), Stats.load(tmp_path / "b.safetensors")
    for i in a.layers:
        for x, y in zip(a.layers[i], b.layers[i]):
            np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_default_folder_and_off(hf_models, tmp_path):
    """Without the option the cache goes to $XDG_CACHE_HOME/mone-jax/xla; `--compile-cache off` writes nothing;
    an unusable folder is a warning, not a failure."""
    model = str(hf_models("olmoe", "a")[0])
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(1).integers(0, 96, (2, 16)).astype(np.int32))
    home = tmp_path / "home"
    _calibrate(model, ids, tmp_path / "s.safetensors", "--compile-cache", "off", env={"XDG_CACHE_HOME": str(home)})
    assert not (home / "mone-jax").exists()
    _calibrate(model, ids, tmp_path / "s.safetensors", env={"XDG_CACHE_HOME": str(home)})
    assert any((home / "mone-jax" / "xla").iterdir())
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    err = _calibrate(model, ids, tmp_path / "s.safetensors", "--compile-cache", str(blocked / "xla"))
    assert "warning: compilation cache disabled" in err and Stats.load(tmp_path / "s.safetensors").tokens == 32
