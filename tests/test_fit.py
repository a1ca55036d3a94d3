"""``prune --fit kd-down``: one run on the tiny Qwen3-MoE, every claim checked in transformers or against the plain
plan: the fit lowers the validation KL, changes only novices, routers, MoE-input norms and kept experts' down
projections, the export is the fitted model, and the plan and card record the fit (``kd``, the same without the
down projections: tests/test_greedy.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import torch, torch_logits, transformers
from safetensors.numpy import load_file

from mone_jax.app.cli import main
from mone_jax.base.stats import Stats
from mone_jax.convert.export import export_from_stats
from mone_jax.pruning.planning import Plan

T = 12


def _kl(teacher: np.ndarray, student: np.ndarray) -> float:
    """Mean KL(teacher || student) over the predicted positions, float64, from two models' logits."""
    def logp(x):
        x = np.asarray(x, np.float64)[:, :-1]
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    t, s = logp(teacher), logp(student)
    return float((np.exp(t) * (t - s)).sum(-1).mean())


def _hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                             dtype=torch.float32).eval()


def _tensors(folder) -> dict[str, np.ndarray]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow
def test_prune_fit_kd_down_lowers_validation_kl_and_exports_the_fitted_model(hf_models, tmp_path):
    folder, original = hf_models("qwen3_moe")
    rng = np.random.default_rng(5)
    valid = rng.integers(0, 96, (4, T)).astype(np.int32)
    np.save(tmp_path / "calib.npy", rng.integers(0, 96, (16, T)).astype(np.int32))
    np.save(tmp_path / "valid.npy", valid)
    out, plan_out, stats_out = tmp_path / "kd", tmp_path / "plan.json", tmp_path / "stats.safetensors"
    assert main(["prune", str(folder), "--calib", str(tmp_path / "calib.npy"), "--ratio", "0.5", "--fit", "kd-down",
                 "--valid", str(tmp_path / "valid.npy"), "--valid-samples", "4", "--out", str(out),
                 "--plan-out", str(plan_out), "--stats-out", str(stats_out), "--quiet"]) == 0
    plan = json.loads(plan_out.read_text())
    fit = plan["fit"]
    assert fit["method"] == "kd-down" and fit["steps"] >= fit["best_step"] > 0
    # the plain plan (same statistics, no fit) exported beside it: the KL before the fit, and what the fit changed
    plain = export_from_stats(folder, tmp_path / "plain", Stats.load(stats_out), replace(Plan.from_dict(plan), fit=None))
    teacher = torch_logits(original, valid)
    kl_before, kl_after = (_kl(teacher, torch_logits(_hf(f), valid)) for f in (plain["out_dir"], out))
    assert kl_after < kl_before
    np.testing.assert_allclose([fit["validation_kl_before"], fit["validation_kl_after"]], [kl_before, kl_after],
                               rtol=1e-4)
    fitted, before = _tensors(out), _tensors(tmp_path / "plain")
    assert fitted.keys() == before.keys()
    changed = {k for k, v in fitted.items() if not np.array_equal(v, before[k])}
    kinds = {"router": ".mlp.gate.weight", "novice": ".expert_replacements.", "norm": ".post_attention_layernorm.",
             "down": "down_proj"}
    assert all(any(s in k for s in kinds.values()) for k in changed), changed  # nothing else moved
    assert all(any(s in k for k in changed) for s in kinds.values())  # each kind did
    assert json.loads((out / "mone_plan.json").read_text()) == plan
    assert "`--fit kd-down`" in (out / "README.md").read_text()
    assert main(["prune", str(folder), "--stats", str(stats_out), "--fit", "kd", "--ratio", "0.5",
                 "--out", str(tmp_path / "x"), "--quiet"]) == 2  # kd trains on calibration tokens: refused
