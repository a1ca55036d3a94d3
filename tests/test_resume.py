"""Resumable calibration: a run killed mid-way and resumed ends with the uninterrupted statistics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from checks import assert_identical
from checks import mesh_batches as batches
from conftest import one_device_env

from mone_jax.app.sequential import calibrate_sequential
from mone_jax.base.errors import UserError
from mone_jax.base.stats import Stats
from mone_jax.calib.calibration import calibrate, identity
from mone_jax.calib.resume import CalibCheckpoint


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "mone_jax.app.cli", *map(str, args)]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_file(hf_models, tmp_path):
    folder, _ = hf_models("olmoe", "a")
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 96, (60, 16)).astype(np.int32))
    common = ["calibrate", folder, "--calib", tmp_path / "ids.npy", "--batch-size", "1", "--quiet"]
    env = one_device_env()
    ref = subprocess.run(cli(*common, "--stats-out", tmp_path / "ref.safetensors"), env=env, capture_output=True,
                         text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    resumable = cli(*common, "--stats-out", tmp_path / "s.safetensors", "--checkpoint-dir", tmp_path / "ck",
                    "--checkpoint-every", "2")
    proc = subprocess.Popen(resumable, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not any(p.name.isdigit() for p in (tmp_path / "ck").glob("*")):  # a finished checkpoint
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (tmp_path / "s.safetensors").exists()
    again = subprocess.run(resumable, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming from the checkpoint" in again.stderr
    assert_identical(Stats.load(tmp_path / "s.safetensors"), Stats.load(tmp_path / "ref.safetensors"))


class Preempted(Exception):
    pass


class DyingCheckpoint(CalibCheckpoint):
    """Raises after its n-th save, like a preemption right after a checkpoint."""

    def __init__(self, *a, die_after: int):
        super().__init__(*a)
        self.left = die_after

    def save(self, *a) -> None:
        super().save(*a)
        self.left -= 1
        if self.left == 0:
            raise Preempted


@pytest.fixture(scope="module")
def sequential_ref(hf_models):
    """qwen2_moe b, 4 batches (3 layers): (folder, data, the uninterrupted layer-at-a-time statistics)."""
    folder, _ = hf_models("qwen2_moe", "b")
    data = batches(96, seed=4) * 2
    return folder, data, calibrate_sequential(folder, data, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("every,die_after", [(3, 1), (2, 3)])  # layer 0 mid-way; layer 1 mid-way
def test_sequential_resumes_inside_a_layer(sequential_ref, tmp_path, every, die_after):
    """Checkpoints inside and at the end of layers; the alternating hidden-state files make both resumable."""
    folder, data, ref = sequential_ref
    from mone_jax.convert.load import config_of

    ident = identity(config_of(folder), "sequential")
    with pytest.raises(Preempted):
        calibrate_sequential(folder, data, progress=False, checkpoint=DyingCheckpoint(tmp_path, every, ident,
                                                                                      die_after=die_after))
    got = calibrate_sequential(folder, data, progress=False, checkpoint=CalibCheckpoint(tmp_path, every, ident))
    assert_identical(got, ref)


def test_resume_refuses_other_data_or_mode(hf_models, tmp_path):
    import mone_jax

    folder, _ = hf_models("olmoe", "a")
    model = mone_jax.load_hf(folder, progress=False)
    ident = identity(model.config, "full")
    data = batches(96, seed=5)
    calibrate(model, data, progress=False, checkpoint=CalibCheckpoint(tmp_path, 1, ident))
    with pytest.raises(UserError, match="other calibration data"):
        calibrate(model, batches(96, seed=6), progress=False, checkpoint=CalibCheckpoint(tmp_path, 1, ident))
    with pytest.raises(UserError, match="belongs to another run"):
        calibrate_sequential(folder, data, progress=False,
                             checkpoint=CalibCheckpoint(tmp_path, 1, identity(model.config, "sequential")))
    with pytest.raises(UserError, match="positive"):
        CalibCheckpoint(tmp_path, 0, ident)
