"""The 2026 criteria: AIMER from the safetensors weights against a float64 NumPy loop, its calibration-free
plan and prune through the CLI, and the refusal of a criterion whose statistic an older file lacks.
(MAN and MSAN against transformers' routed tokens: tests/test_calibration.py and test_families.py.)"""

from __future__ import annotations

import json
import re
from collections import defaultdict

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mone_jax.app.cli import main
from mone_jax.base.errors import UserError
from mone_jax.base.stats import LayerStats, Stats
from mone_jax.convert.criteria import weight_scores
from mone_jax.pruning.card import STATS_FILE
from mone_jax.pruning.planning import Plan, make_plan

_PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.\w+\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(?:gate_up_proj|down_proj)$")  # GPT-OSS [E, ...]


def reference_ratios(folder) -> dict[int, np.ndarray]:
    """AIMER's mean(|w|) / sqrt(mean(w^2)) per expert, float64, over every entry of the expert's weight
    matrices as the safetensors file stores them (biases are not weight matrices)."""
    entries: dict[int, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    matrices = 3  # gate, up, down; GPT-OSS: its gate_up and down rows
    for key, t in load_file(str(folder / "model.safetensors")).items():
        if m := _PER_EXPERT.match(key):
            entries[int(m[1])][int(m[2])].append(t.astype(np.float64).ravel())
        elif m := _FUSED.match(key):
            matrices = 2
            for e, row in enumerate(t.astype(np.float64)):
                entries[int(m[1])][e].append(row.ravel())
    out = {}
    for layer, experts in entries.items():
        assert all(len(experts[e]) == matrices for e in experts)
        w = [np.concatenate(experts[e]) for e in range(len(experts))]
        out[layer] = np.array([np.abs(x).mean() / np.sqrt((x * x).mean()) for x in w])
    return out


@pytest.mark.parametrize("family,variant", [("olmoe", "a"), ("mixtral", "b"), ("deepseek_v3", "grouped_yarn"),
                                            ("gpt_oss", "a")])
def test_aimer_scores_match_float64_reference(hf_models, family, variant):
    folder, _ = hf_models(family, variant)
    ours, ref = weight_scores(folder, "aimer", progress=False), reference_ratios(folder)
    assert sorted(ours) == sorted(ref)
    for layer, r in ref.items():
        np.testing.assert_allclose(ours[layer], -r, rtol=1e-5, atol=0)  # kept score: the negated ratio


def test_aimer_plan_and_drop_prune_need_no_calibration(hf_models, tmp_path, capsys):
    folder, hf = hf_models("olmoe", "a")  # 8 experts per layer
    keep, E = 5, hf.config.num_experts
    capsys.readouterr()
    assert main(["plan", str(folder), "--metric", "aimer", "--keep", str(keep), "--plan-out",
                 str(tmp_path / "p.json")]) == 0
    assert "\r" not in capsys.readouterr().err  # stderr is no terminal: no progress bar
    plan = Plan.load(tmp_path / "p.json")
    for layer, r in reference_ratios(folder).items():
        pruned = np.argsort(-r, kind="stable")[:E - keep]  # AIMER: prune the k highest ratios
        assert plan.layers[layer].novices == tuple(sorted(pruned.tolist()))
    assert main(["prune", str(folder), "--metric", "aimer", "--keep", str(keep), "--format", "drop",
                 "--out", str(tmp_path / "out"), "--plan-out", str(tmp_path / "p2.json"), "--quiet"]) == 0
    assert Plan.load(tmp_path / "p2.json") == plan
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_experts"] == keep and not (tmp_path / "out" / STATS_FILE).exists()  # nothing calibrated


def test_weights_and_statistics_are_not_confused(hf_models, tmp_path, capsys):
    folder, _ = hf_models("olmoe", "a")
    stats = _stats(8)
    stats.save(tmp_path / "s.safetensors")
    assert main(["plan", str(tmp_path / "s.safetensors"), "--metric", "aimer", "--keep", "4",
                 "--plan-out", str(tmp_path / "p.json")]) == 2
    assert "scores the weights" in capsys.readouterr().err
    assert main(["plan", str(folder), "--metric", "man", "--keep", "4", "--plan-out", str(tmp_path / "p.json")]) == 2
    assert "needs a statistics file" in capsys.readouterr().err
    assert main(["prune", str(folder), "--metric", "aimer", "--keep", "4", "--out", str(tmp_path / "o")]) == 2
    assert "calibration data" in capsys.readouterr().err  # substitution writes novices: still calibrates
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "o").exists()


def _stats(E: int, hidden: int = 32) -> Stats:
    rng = np.random.default_rng(0)
    layer = LayerStats(rng.integers(2, 20, E), rng.random(E), rng.normal(size=(E, hidden)), rng.random((E, hidden)),
                       rng.random(E), rng.random(E))
    return Stats({0: layer, 1: layer}, 64, {"model_type": "olmoe"})


def test_older_statistics_file_refuses_man_but_serves_the_rest(tmp_path):
    path = tmp_path / "old.safetensors"
    _stats(8).save(path)
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.endswith("output_norm_sum")}
    save_file(tensors, str(path), metadata={"model_type": "olmoe", "format_version": "1"})
    old = Stats.load(path)
    assert old.missing == {"norm_sum"}
    with pytest.raises(UserError, match="output_norm_sum.*recalibrate"):
        make_plan(old, keep=4, metric="man")
    assert main(["plan", str(path), "--metric", "msan", "--keep", "4", "--plan-out", str(tmp_path / "p.json")]) == 0
    old.save(tmp_path / "again.safetensors")  # zeros standing in for the missing field are never written
    assert "layers.0.output_norm_sum" not in load_file(str(tmp_path / "again.safetensors"))
