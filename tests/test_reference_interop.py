"""Interoperation with the MoNE reference code (zxgx/mode-pd): its real outputs on the demo model, its
per-call recurrence against a NumPy loop, and modepd exports its transformers 4.x config classes read."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import transformers  # noqa: F401  (skips without transformers)
from flax import nnx
from safetensors import safe_open

import mone_jax
from mone_jax.app.cli import main
from mone_jax.base.errors import UserError
from mone_jax.base.stats import LayerStats, Stats
from mone_jax.convert.export import export_pruned
from mone_jax.convert.families import parse_config
from mone_jax.demo import demo_model_dir
from mone_jax.pruning.planning import make_plan

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "mode-pd-demo"
KS = (12, 8)


def _reference_dir() -> Path:
    """The reference outputs folder, or a skip saying why they cannot describe the demo model."""
    if not (REF / "README.md").is_file():
        pytest.skip(f"the reference outputs are absent ({REF})")
    want = re.search(r"sha256 prefix `([0-9a-f]+)`", (REF / "README.md").read_text())
    got = hashlib.sha256((demo_model_dir() / "model.safetensors").read_bytes()).hexdigest()
    if not want or not got.startswith(want[1]):
        pytest.skip(f"the demo model changed (sha256 {got[:20]}, the reference outputs describe "
                    f"{want[1] if want else '?'}): its outputs no longer apply")
    return REF


@pytest.fixture(scope="module")
def ref_stats():
    """Reference-semantics statistics of the demo model on the reference's calibration rows, batch size 1 in row
    order (one call per row, as the reference ran), per dtype (computed on first use)."""
    folder, cache = _reference_dir(), {}

    def get(dtype: str) -> Stats:
        if dtype not in cache:
            rows = np.load(folder / "calib_ids_24x512.npy")[:16]
            model = mone_jax.load_hf(demo_model_dir(), dtype=dtype, progress=False)
            model.impl = "dense"  # compiles fastest; every dispatch gives the same batch statistics (test_moe)
            cache[dtype] = mone_jax.calibrate(model, [rows[r:r + 1] for r in range(16)], progress=False,
                                              semantics="reference")
        return cache[dtype]

    return get


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("scope", ["layer", "model"])
def test_float32_run_reproduces_the_reference(ref_stats, scope):
    stats = ref_stats("float32")
    assert stats.meta["semantics"] == "reference"
    for k in KS:
        ref = np.load(REF / f"ref_fp32{'_model' if scope == 'model' else ''}_k{k}.npz")
        plan = make_plan(stats, keep=k, scope=scope, semantics="reference")
        for layer, s in stats.layers.items():
            p = f"l{layer}."
            np.testing.assert_array_equal(s.ref_count, ref[p + "num_tokens"])
            assert _rel(s.weight_sum / stats.tokens, ref[p + "rs"]) < 1e-4
            assert _rel(s.ref_mean, ref[p + "baseline_out"]) < 1e-4
            assert _rel(s.ref_var, ref[p + "fluc_out"]) < 1e-4
            assert _rel(plan.layers[layer].scores, ref[p + "metric"]) < 1e-4
            assert list(plan.layers[layer].novices) == ref[p + "novices"].tolist(), (scope, k, layer)
        assert plan.semantics == "reference"
    # the approximate variance is not the exact one (median ratio about 0.93 on this model)
    ratio = np.median(np.concatenate([s.ref_var.sum(1) / s.var.sum(1) for s in stats.layers.values()]))
    assert 0.8 < ratio < 0.99


@pytest.mark.slow
def test_bfloat16_run_keeps_the_reference_sets(ref_stats):
    stats = ref_stats("bfloat16")
    for k in KS:
        ref = np.load(REF / f"ref_bf16_k{k}.npz")
        plan = make_plan(stats, keep=k, semantics="reference")
        for layer in stats.layers:
            assert list(plan.layers[layer].novices) == ref[f"l{layer}.novices"].tolist(), (k, layer)


def test_reference_novices_are_bfloat16_means(ref_stats):
    stats = ref_stats("float32")
    plan = make_plan(stats, keep=12, semantics="reference")
    model = mone_jax.load_hf(demo_model_dir(), progress=False)
    pruned = mone_jax.prune(model, stats, plan)
    ref = np.load(REF / "ref_fp32_k12.npz")
    for layer, blk in pruned.moe_blocks().items():
        want = ref[f"l{layer}.baseline_out"][ref[f"l{layer}.novices"]].astype(ml_dtypes.bfloat16)
        got = np.asarray(blk.novice_values[...], np.float32)
        np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-2, atol=1e-6)
        assert np.array_equal(got.astype(ml_dtypes.bfloat16).astype(np.float32), got)  # bf16 values


def test_reference_checkpoint_loads_and_round_trips_as_modepd(tmp_path):
    folder = _reference_dir()
    ids = np.load(folder / "eval_ids.npy")[:, :32]
    want = np.load(folder / "checkpoint_bf16_k12_ref_logits_first32.npy")
    theirs = mone_jax.load_hf(folder / "checkpoint_bf16_k12", progress=False)
    logits = np.asarray(theirs(ids), np.float32)
    assert np.max(np.abs(logits - want)) < 1e-4
    mone_jax.save_hf(theirs, tmp_path / "ours", format="modepd", source=demo_model_dir())
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert "auto_map" not in cfg and not (tmp_path / "ours" / "modeling_mone.py").exists()
    assert cfg["approximate_experts"] == json.loads((folder / "checkpoint_bf16_k12" / "config.json").read_text())[
        "approximate_experts"]
    back = dict(nnx.to_flat_state(nnx.state(mone_jax.load_hf(tmp_path / "ours", progress=False))))
    for path, var in nnx.to_flat_state(nnx.state(theirs)):  # every array equal: the same model, the same logits
        np.testing.assert_array_equal(np.asarray(back[path].get_value()), np.asarray(var.get_value()), str(path))


class Legacy4xConfig:
    """A transformers 4.x-style config class: reads only the legacy keys, with the 4.x defaults (as the
    reference's Qwen3-MoE / DeepSeek-V2 config classes do)."""

    EXPERTS = {"qwen3_moe": ("num_experts", 128), "deepseek_v2": ("n_routed_experts", 64)}

    def __init__(self, model_type: str, rope_theta: float = 10000.0, rope_scaling: dict | None = None,
                 torch_dtype: str | None = None, **kwargs):
        key, default = self.EXPERTS[model_type.removesuffix("_compressed")]
        self.num_experts = kwargs.get(key, default)
        self.rope_theta, self.rope_scaling, self.torch_dtype = rope_theta, rope_scaling, torch_dtype


@pytest.mark.parametrize("family,variant", [("qwen3_moe", "a"), ("deepseek_v2", "group_yarn")])
def test_modepd_config_reads_in_a_transformers_4_config_class(hf_models, tmp_path, family, variant):
    src, original = hf_models(family, variant)
    work = shutil.copytree(src, tmp_path / "src")
    cfg = json.loads((work / "config.json").read_text())
    cfg["rope_parameters"]["rope_theta"] = 1e6  # a theta the 4.x default would silently replace
    (work / "config.json").write_text(json.dumps(cfg))
    E = original.config.num_experts if family == "qwen3_moe" else original.config.n_routed_experts
    moe = [i for i, layer in enumerate(original.model.layers) if hasattr(layer.mlp, "experts")]
    plan = {"layers": {str(i): {"kept": list(range(E - 2)), "novices": [E - 2, E - 1]} for i in moe}}
    novices = {i: {e: np.zeros(cfg["hidden_size"], np.float32) for e in (E - 2, E - 1)} for i in moe}
    export_pruned(work, tmp_path / "out", plan, novices, fmt="modepd")
    legacy = Legacy4xConfig(**json.loads((tmp_path / "out" / "config.json").read_text()))
    assert legacy.num_experts == E and legacy.rope_theta == 1e6
    assert legacy.torch_dtype == cfg.get("dtype")
    scaling = cfg["rope_parameters"]
    if scaling["rope_type"] == "default":
        assert legacy.rope_scaling is None
    else:  # the 4.x name of the type and every scaling parameter
        assert legacy.rope_scaling["type"] == scaling["rope_type"]
        assert {k: legacy.rope_scaling[k] for k in scaling if k != "rope_theta"} == \
            {k: v for k, v in scaling.items() if k != "rope_theta"}
    # and mone-jax reads the folder back as the same model
    back = parse_config(json.loads((tmp_path / "out" / "config.json").read_text()))
    assert back.rope.theta == 1e6 and back.num_experts == E


def _numpy_reference(calls: list[np.ndarray]) -> tuple[int, np.ndarray, np.ndarray]:
    """The reference's per-call recurrence, written out for one expert over raw outputs (float64)."""
    n, mean, var = 0, np.zeros(calls[0].shape[1]), np.zeros(calls[0].shape[1])
    for y in calls:
        b = y.shape[0]
        if b == 0 or (n == 0 and b == 1):
            continue
        mean = mean * n / (n + b) + y.sum(0) / (n + b)
        if n > 0:
            var = var * (n - 1) / (n + b - 1) + ((y - mean) ** 2).sum(0) / (n + b)
        n += b
    return n, mean, var


def test_reference_recurrence_matches_a_numpy_loop():
    rng = np.random.default_rng(0)
    sizes = [[1, 3, 0, 5], [0, 1, 1, 4], [2, 0, 1, 1], [1, 1, 1, 1]]  # per expert: tokens of each call
    d, E = 5, len(sizes)
    outs = [[rng.normal(size=(b, d)) * (e + 1) + e for b in row] for e, row in enumerate(sizes)]
    acc = LayerStats.zeros(E, d)
    for c in range(4):
        batch = LayerStats.zeros(E, d)
        for e in range(E):
            y = outs[e][c]
            if len(y):
                batch.count[e] = len(y)
                batch.mean[e] = y.mean(0)
                batch.m2[e] = ((y - y.mean(0)) ** 2).sum(0)
        acc = acc.merge(batch)
    for e in range(E):
        n, mean, var = _numpy_reference(outs[e])
        assert acc.ref_count[e] == n
        np.testing.assert_allclose(acc.ref_mean[e], mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(acc.ref_var[e], var, rtol=1e-12, atol=1e-12)
    assert acc.ref_count[0] == 8 and acc.count[0] == 9  # its first call (a single token) is never counted
    assert acc.ref_count[3] == 0 and acc.count[3] == 4  # nor are single-token calls while it has none


def test_reference_semantics_needs_reference_statistics():
    s = LayerStats.zeros(4, 2)._replace(count=np.array([3, 3, 3, 3]), weight_sum=np.ones(4))
    stats = Stats({0: s}, 10, {"semantics": "exact"})
    with pytest.raises(UserError, match="calibrated with semantics 'reference'"):
        make_plan(stats, keep=2, semantics="reference")
    with pytest.raises(UserError, match="unknown semantics"):
        make_plan(stats, keep=2, semantics="approximate")
    stats.meta["semantics"] = "reference"
    with pytest.raises(UserError, match="no reference semantics"):
        make_plan(stats, keep=2, metric="reap", semantics="reference")


def test_cli_reference_semantics_from_calibration_to_modepd_export(hf_models, tmp_path, capsys):
    folder, _ = hf_models("olmoe", "a")
    np.save(tmp_path / "ids.npy", np.random.default_rng(1).integers(0, 96, (4, 16)).astype(np.int32))
    exact, ref = tmp_path / "exact.safetensors", tmp_path / "ref.safetensors"
    calib = ["--calib", tmp_path / "ids.npy", "--batch-size", "2", "--quiet"]
    assert main(["calibrate", str(folder), *map(str, calib), "--stats-out", str(ref), "--semantics", "reference"]) == 0
    stats = Stats.load(ref)
    assert stats.meta["semantics"] == "reference"
    Stats(stats.layers, stats.tokens, {**stats.meta, "semantics": "exact"}).save(exact)  # as an exact run writes it
    with safe_open(str(exact), "np") as f:
        assert f.metadata()["semantics"] == "exact" and not any("reference" in k for k in f.keys())
    for s in stats.layers.values():  # two calls: counts and means as exact unless a first call had one token
        first_single = s.ref_count < s.count
        np.testing.assert_array_equal(s.ref_count[~first_single], s.count[~first_single])
        np.testing.assert_allclose(s.ref_mean[~first_single], s.mean[~first_single], rtol=1e-5, atol=1e-6)
    assert main(["plan", str(exact), "--keep", "5", "--semantics", "reference", "--plan-out",
                 str(tmp_path / "bad.json")]) == 2
    assert "recalibrate with semantics 'reference'" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()
    assert Stats.load(exact).layers[0].ref_mean.shape == stats.layers[0].mean.shape  # absent fields read as 0
    out = tmp_path / "out"
    assert main(["prune", str(folder), "--stats", str(ref), "--keep", "5", "--semantics", "reference", "--format",
                 "modepd", "--out", str(out), "--plan-out", str(tmp_path / "p.json"), "--quiet"]) == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["semantics"] == "reference"
    cfg = json.loads((out / "config.json").read_text())
    assert "auto_map" not in cfg and cfg["num_experts"] == 8
    with safe_open(str(out / "model.safetensors"), "np") as f:
        for layer, entry in plan["layers"].items():
            for e in entry["novices"]:
                got = f.get_tensor(f"model.layers.{layer}.mlp.experts.{e}.approx_value").astype(np.float32)
                want = stats.layers[int(layer)].ref_mean[e].astype(np.float32).astype(ml_dtypes.bfloat16)
                np.testing.assert_array_equal(got, want.astype(np.float32))
