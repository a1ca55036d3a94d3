"""The command line as a user runs it (subprocesses), and ``main`` run in-process twice."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_close_logits, torch_logits

import mone_jax
from mone_jax.app.cli import main
from mone_jax.base import phases
from mone_jax.base.stats import Stats


def run(*args, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "mone_jax.app.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_inspect(hf_models):
    folder, hf = hf_models("qwen2_moe", "a")
    out = json.loads(run("inspect", folder, "--json").stdout)
    n_params = sum(p.numel() for p in hf.parameters())
    assert out["params_total"] == n_params
    assert out["moe_layers"] == [1] and out["dense_layers"] == [0, 2]  # decoder_sparse_step = 2
    assert out["experts"] == 6 and out["top_k"] == 2
    routed = sum(p.numel() for n, p in hf.named_parameters() if ".mlp.experts." in n)
    assert out["params_routed_experts"] == routed
    assert out["params_active_per_token"] == n_params - routed + routed * 2 // 6
    assert out["bytes"] == 4 * n_params
    assert "qwen2_moe" in run("inspect", folder).stdout


@pytest.mark.slow
def test_forward_writes_transformers_logits(hf_models, tmp_path):
    folder, hf = hf_models("mixtral", "a")
    ids = np.random.default_rng(0).integers(0, 96, (2, 9)).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    run("forward", folder, "--tokens", tmp_path / "ids.npy", "--out", tmp_path / "logits.npy")
    assert_close_logits(np.load(tmp_path / "logits.npy"), torch_logits(hf, ids))


@pytest.mark.slow
def test_calibrate_then_plan(hf_models, tmp_path):
    folder, _ = hf_models("olmoe", "a")
    np.save(tmp_path / "ids.npy", np.random.default_rng(1).integers(0, 96, (4, 16)).astype(np.int32))
    run("calibrate", folder, "--calib", tmp_path / "ids.npy", "--stats-out", tmp_path / "s.safetensors",
        "--batch-size", "2", "--quiet")
    stats = Stats.load(tmp_path / "s.safetensors")
    assert stats.tokens == 64 and sorted(stats.layers) == [0, 1]
    run("plan", tmp_path / "s.safetensors", "--keep", "5", "--metric", "reap", "--plan-out", tmp_path / "p.json")
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["metric"] == "reap" and all(len(v["kept"]) == 5 for v in plan["layers"].values())
    # a refused `plan --keep 9`: tests/test_errors.py ("--keep > experts (plan)"; the real-process contract there)


def test_main_leaves_the_process_as_it_found_it(capsys, monkeypatch):
    """Two in-process runs print the same (but for timings) and leave phase lines, the warning display and the
    environment as they were, on success and on a refused input."""
    demo = str(Path(mone_jax.__file__).parent / "demo" / "model")

    def shown(*_):
        pass

    monkeypatch.setattr(warnings, "showwarning", shown)
    env = dict(os.environ)
    for argv in (["inspect", demo], ["calibrate", demo, "--calib", "self", "--sequential", "--stats-out", "s"]):
        runs = []
        for _ in range(2):
            code = main(argv)
            out, err = capsys.readouterr()
            runs.append((code, out, re.sub(r"\[\d+\.\ds\]", "[t]", err)))
            assert warnings.showwarning is shown and not phases.enabled() and dict(os.environ) == env
        assert runs[0] == runs[1]
    assert runs[0][0] == 2 and "mone-jax: [t] check:" in runs[0][2]  # phase lines were on during the run
