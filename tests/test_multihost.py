"""Two jax.distributed processes on 127.0.0.1 (gloo CPU collectives) give one process's statistics."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from checks import assert_stats_equal

import mone_jax
from mone_jax.base.stats import Stats
from mone_jax.calib.calibration import calibrate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(hf_models, tmp_path):
    folder, _ = hf_models("olmoe", "a")
    ids = np.random.default_rng(7).integers(0, 96, (12, 16)).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4")  # 2 processes x 4 devices = mesh (4, 2)
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "mone_jax.app.cli", "calibrate", str(folder), "--calib", str(tmp_path / "ids.npy"),
         "--batch-size", "6", "--stats-out", str(tmp_path / f"p{i}.safetensors"), "--mesh", "data=4,expert=2",
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
         "--heartbeat-timeout", "10", "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert not (tmp_path / "p1.safetensors").exists()  # process 0 alone writes
    model = mone_jax.load_hf(folder, progress=False)
    ref = calibrate(model, [ids[:6], ids[6:]], progress=False)
    assert_stats_equal(Stats.load(tmp_path / "p0.safetensors"), ref)
