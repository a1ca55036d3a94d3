"""``--fit kd``: distillation lowers the validation KL, fits only its tensors, and the export of the fitted model
equals the fitted JAX model in transformers; ``prune --fit kd`` records the fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_close_logits, torch, torch_logits, transformers
from flax import nnx

from mone_jax.app.cli import main
from mone_jax.calib.calibration import calibrate
from mone_jax.convert.export import export_model
from mone_jax.convert.load import load_hf
from mone_jax.evaluate.distill import distill, fitted_path
from mone_jax.pruning.planning import make_plan
from mone_jax.pruning.transform import prune

T = 12


def _kl(teacher, student, ids: np.ndarray) -> float:
    """Mean KL(teacher || student) over predicted positions, float64 from each model's logits."""
    def logp(m):
        x = np.asarray(m(ids), np.float64)[:, :-1]
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    t, s = logp(teacher), logp(student)
    return float((np.exp(t) * (t - s)).sum(-1).mean())


@pytest.mark.slow
def test_kd_lowers_validation_kl_fits_only_its_tensors_and_exports_what_it_fitted(hf_models, tmp_path):
    folder, _ = hf_models("qwen3_moe")
    rng = np.random.default_rng(5)
    calib, valid = rng.integers(0, 96, (16, T)).astype(np.int32), rng.integers(0, 96, (4, T)).astype(np.int32)
    model = load_hf(folder, progress=False)
    stats = calibrate(model, [calib], progress=False)
    student = prune(model, stats, make_plan(stats, keep=4))
    before = {path: np.array(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(student))}
    kl_before = _kl(model, student, valid)
    record = distill(model, student, calib, valid, max_steps=30, eval_every=3, progress=False)
    kl_after = _kl(model, student, valid)
    assert kl_after < kl_before
    np.testing.assert_allclose([record["validation_kl_before"], record["validation_kl_after"]], [kl_before, kl_after],
                               rtol=1e-4)
    after = {path: np.array(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(student))}
    changed = {path for path, v in before.items() if not np.array_equal(v, after[path])}
    assert changed and all(fitted_path(student, p) for p in changed)  # only novices, routers, MoE-input norms
    assert {p[-1] for p in changed} >= {"novice_values", "router", "weight"}
    out = export_model(student, folder, tmp_path / "kd")["out_dir"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert_close_logits(np.asarray(student(valid)), torch_logits(hf, valid))


@pytest.mark.slow
def test_prune_fit_kd_records_the_fit(hf_models, tmp_path):
    folder, _ = hf_models("qwen3_moe")
    rng = np.random.default_rng(6)
    np.save(tmp_path / "calib.npy", rng.integers(0, 96, (12, T)).astype(np.int32))
    out, plan_out = tmp_path / "out", tmp_path / "plan.json"
    assert main(["prune", str(folder), "--calib", str(tmp_path / "calib.npy"), "--ratio", "0.5", "--fit", "kd",
                 "--valid-fraction", "0.25", "--out", str(out), "--plan-out", str(plan_out), "--quiet"]) == 0
    fit = json.loads(plan_out.read_text())["fit"]
    assert fit["method"] == "kd" and fit["steps"] >= fit["best_step"]
    assert fit["validation_kl_after"] <= fit["validation_kl_before"]
    assert "--fit kd" in (out / "README.md").read_text()
    assert main(["verify", str(out)]) == 0
    assert main(["prune", str(folder), "--stats", str(plan_out), "--fit", "kd", "--ratio", "0.5",
                 "--out", str(tmp_path / "x"), "--quiet"]) == 2
