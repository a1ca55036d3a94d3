"""Sharded calibration on 8 forced CPU devices equals one device; mesh parsing and partition rules."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import mone_jax
from mone_jax.calibration import calibrate
from mone_jax.errors import UserError
from mone_jax.scoring import make_plan
from mone_jax.sharding import make_mesh, mesh_shape, param_specs
from mone_jax.stats import Stats

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
FIELDS = ("weight_sum", "mean", "m2", "reap_sum")


def batches(vocab: int, seed: int = 0) -> list[dict]:
    """Batches of 5 rows (padded to the data axis) with some padding tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        ids = rng.integers(0, vocab, (5, 16)).astype(np.int32)
        mask = np.ones((5, 16), np.int32)
        mask[0, 11:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def assert_stats_equal(got: Stats, ref: Stats, rtol: float = 1e-6) -> None:
    """Counts and tokens exact; every float tensor within rtol of its own magnitude (max |ref|)."""
    assert got.tokens == ref.tokens and sorted(got.layers) == sorted(ref.layers)
    for i, r in ref.layers.items():
        g = got.layers[i]
        np.testing.assert_array_equal(g.count, r.count, err_msg=f"layer {i} count")
        for f in FIELDS:
            a, b = getattr(g, f), getattr(r, f)
            assert np.abs(a - b).max() <= rtol * np.abs(b).max(), f"layer {i} {f}"


def kept(plan: dict) -> dict:
    return {k: (v["kept"], v["novices"]) for k, v in plan["layers"].items()}


@pytest.mark.parametrize("family,variant", [("olmoe", "a"), ("qwen2_moe", "b")])
def test_meshes_match_one_device(hf_models, family, variant):
    assert jax.device_count() == 8
    folder, _ = hf_models(family, variant)
    model = mone_jax.load_hf(folder, progress=False)
    data = batches(model.config.vocab_size)
    ref = calibrate(model, data, progress=False)
    plans = {(m, s): kept(make_plan(ref, keep=3, metric=m, scope=s)) for m in ("mone", "reap") for s in ("layer", "model")}
    for shape in MESHES:
        got = calibrate(model, data, mesh=make_mesh(shape), progress=False)
        assert_stats_equal(got, ref)
        for (m, s), plan in plans.items():
            assert kept(make_plan(got, keep=3, metric=m, scope=s)) == plan, (shape, m, s)


def test_param_specs_split_only_routed_experts(hf_models):
    model = mone_jax.load_hf(hf_models("qwen2_moe", "b")[0], progress=False)
    from flax import nnx

    specs = nnx.to_flat_state(param_specs(nnx.state(model)))
    split = {".".join(map(str, path)) for path, v in specs if v.get_value() == P("expert")}
    assert split == {f"layers.{i}.mlp.{n}" for i in (1, 2) for n in ("gate_up", "down", "kept_ids")}


def test_mesh_shape_choices_and_errors():
    assert mesh_shape("data=4,expert=2", 8, 8) == (4, 2)
    assert mesh_shape("expert=2", 8, 8) == (4, 2) and mesh_shape("data=2", 8, 8) == (2, 4)
    assert mesh_shape("auto", 8, 8) == (8, 1)  # no device memory known (CPU): data parallel
    # auto with a device memory: the smallest expert split for which the parameters fit 70% of it
    assert mesh_shape("auto", 8, 16, param_bytes=(4, 100), device_bytes=50) == (2, 4)
    for spec, experts, msg in [("data=3,expert=2", 8, "needs 6 devices"), ("expert=3", 9, "does not divide"),
                               ("data=2,expert=4", 6, "does not divide the model's 6 experts"),
                               ("model=2", 8, "bad --mesh"), ("data=0", 8, "bad --mesh"), ("data=x", 8, "bad --mesh")]:
        with pytest.raises(UserError, match=msg):
            mesh_shape(spec, 8, experts)
    with pytest.raises(UserError, match="does not fit"):
        mesh_shape("auto", 8, 8, param_bytes=(100, 100), device_bytes=50)
