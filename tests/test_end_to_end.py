"""Calibrate -> plan -> prune -> export from the Python API and the command line: sizes, verification, refusals.
(Logits of every family's export in every format against transformers: test_import_pruned, test_export,
test_state_dict.)"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import transformers

import mone_jax


def _pipeline(hf_models, family, variant="a", keep=None, seed=0):
    folder, hf = hf_models(family, variant)
    model = mone_jax.load_hf(folder, progress=False)
    rng = np.random.default_rng(seed)
    stats = mone_jax.calibrate(model, [rng.integers(0, hf.config.vocab_size, (4, 16)).astype(np.int32)],
                               progress=False)
    E = model.config.num_experts
    plan = mone_jax.plan(stats, keep=keep or max(model.config.top_k, E // 2))
    return folder, hf, model, stats, plan


def test_export_size_drops_as_planned(hf_models, tmp_path):
    folder, hf, model, stats, plan = _pipeline(hf_models, "olmoe", keep=3)
    out = tmp_path / "sized"
    summary = mone_jax.save_hf(mone_jax.prune(model, stats, plan), out, source=folder)
    cfg = model.config
    n_moe, E, K = len(cfg.moe_layer_ids), cfg.num_experts, 3
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    total_before = sum(p.numel() for p in hf.parameters())
    expected_after = total_before - n_moe * (E - K) * per_expert + n_moe * (E - K) * cfg.hidden_size
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert sum(p.numel() for p in loaded.parameters()) == expected_after
    size_in = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    size_out = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert size_in - size_out == pytest.approx(4 * (total_before - expected_after), abs=4096)  # headers differ
    assert json.dumps(summary)  # the summary is plain data


@pytest.mark.slow
def test_cli_prune_and_verify(hf_models, tmp_path):
    folder, _ = hf_models("qwen3_moe", "a")
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 96, (4, 16)).astype(np.int32))
    out = tmp_path / "cli_out"
    cmd = [sys.executable, "-m", "mone_jax.app.cli", "prune", str(folder), "--calib", str(tmp_path / "ids.npy"),
           "--ratio", "0.5", "--out", str(out), "--stats-out", str(tmp_path / "s.safetensors"),
           "--plan-out", str(tmp_path / "p.json"), "--quiet"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    plan = json.loads((tmp_path / "p.json").read_text())
    assert all(len(v["kept"]) == 4 for v in plan["layers"].values())
    v = subprocess.run([sys.executable, "-m", "mone_jax.app.cli", "verify", str(out)], capture_output=True, text=True)
    assert v.returncode == 0, v.stderr
    shard = next(out.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # corrupt one byte of tensor data
    shard.write_bytes(bytes(data))
    v = subprocess.run([sys.executable, "-m", "mone_jax.app.cli", "verify", str(out)], capture_output=True, text=True)
    assert v.returncode == 2 and "failed verification" in v.stderr and "Traceback" not in v.stderr
    # a second prune into the existing --out is refused: tests/test_errors.py ("output folder not empty")


def test_reexport_of_a_pruned_checkpoint_is_refused(hf_models, tmp_path):
    from mone_jax.base.errors import UserError

    folder, _, model, stats, plan = _pipeline(hf_models, "olmoe")
    out = tmp_path / "once"
    mone_jax.save_hf(mone_jax.prune(model, stats, plan), out, source=folder)
    again = mone_jax.load_hf(out, progress=False)  # imports the substitution layout
    with pytest.raises(UserError, match="already a pruned checkpoint"):
        mone_jax.save_hf(again, tmp_path / "twice", source=out)
