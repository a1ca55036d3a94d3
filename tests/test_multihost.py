"""Two jax.distributed processes on 127.0.0.1 (gloo CPU collectives) give one process's statistics."""

from __future__ import annotations

import os
import shutil
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


@pytest.mark.slow
def test_processes_that_resolved_a_hub_id_to_different_commits_stop(hf_models, tmp_path):
    """Each process resolves `testorg/tiny` in its own hub cache, whose main points at another commit (a push
    between the hosts' start-ups): both refuse with one line naming both commits, and nothing is written."""
    folder, _ = hf_models("olmoe", "a")
    np.save(tmp_path / "ids.npy", np.random.default_rng(7).integers(0, 96, (4, 16)).astype(np.int32))
    commits = ["a" * 40, "b" * 40]
    for i, commit in enumerate(commits):
        repo = tmp_path / f"hub{i}" / "models--testorg--tiny"
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", HF_HUB_OFFLINE="1")
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "mone_jax.app.cli", "calibrate", "testorg/tiny", "--calib", str(tmp_path / "ids.npy"),
         "--stats-out", str(tmp_path / "s.safetensors"), "--coordinator", f"127.0.0.1:{port}", "--num-processes",
         "2", "--process-id", str(i), "--heartbeat-timeout", "10", "--quiet"],
        env={**env, "HF_HUB_CACHE": str(tmp_path / f"hub{i}")}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    try:
        errs = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [2, 2], errs
    for err in errs:
        assert err.count("\n") == 1 and f"process 0: {commits[0]}, process 1: {commits[1]}" in err and "--revision" in err
    assert not (tmp_path / "s.safetensors").exists()
