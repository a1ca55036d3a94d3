"""Sharded calibration on 8 forced CPU devices equals one device; mesh parsing and partition rules."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from checks import assert_stats_equal
from checks import mesh_batches as batches
from conftest import STRUCTURES, tiered
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mone_jax
from mone_jax.base.errors import UserError
from mone_jax.calib.calibration import batch_tables, calibrate, layer_programs, shard_batch, windows
from mone_jax.model.sharding import batch_spec, make_mesh, mesh_shape, param_specs
from mone_jax.pruning.planning import Plan, make_plan

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
# one family per layer structure on data=2,expert=4, plus expert axes that do not divide the expert count (6 on 4, 4 on 8)
CASES = [(*v, (2, 4)) for v in STRUCTURES] + [("qwen2_moe", "a", (2, 4)), ("mixtral", "a", (1, 8))]


def kept(plan: Plan) -> dict:
    return {i: (lp.kept, lp.novices) for i, lp in plan.layers.items()}


def test_meshes_match_one_device(hf_models):
    """Every mesh shape gives one device's statistics and plans."""
    assert jax.device_count() == 8
    folder, _ = hf_models("olmoe", "a")
    model = mone_jax.load_hf(folder, progress=False)
    data = batches(model.config.vocab_size)
    ref = calibrate(model, data, progress=False)
    plans = {(m, s): kept(make_plan(ref, keep=3, metric=m, scope=s)) for m in ("mone", "reap") for s in ("layer", "model")}
    for shape in MESHES:
        got = calibrate(model, data, mesh=make_mesh(shape), progress=False)
        assert_stats_equal(got, ref)
        for (m, s), plan in plans.items():
            assert kept(make_plan(got, keep=3, metric=m, scope=s)) == plan, (shape, m, s)


@pytest.mark.parametrize("family,variant,shape", tiered(CASES, fast=STRUCTURES))
def test_expert_mesh_matches_one_device(hf_models, family, variant, shape):
    """Each family on an expert mesh; padded expert rows (E not divisible by the axis) stay inert."""
    model = mone_jax.load_hf(hf_models(family, variant)[0], progress=False)
    data = batches(model.config.vocab_size)
    got = calibrate(model, data, mesh=make_mesh(shape), progress=False)
    assert all(s.count.shape == (model.config.num_experts,) for s in got.layers.values())
    assert_stats_equal(got, calibrate(model, data, progress=False))


def step_flops(model, shape: tuple[int, int], rows: int = 32, seq: int = 64) -> float:
    """XLA's per-device flop count of the compiled calibration layer steps of one batch on a ``shape`` mesh."""
    mesh = make_mesh(shape, jax.devices()[:shape[0] * shape[1]])
    table, programs = layer_programs(model, mesh)
    mask = shard_batch(np.ones((rows, seq), bool), mesh)
    x = jax.device_put(table[np.zeros((rows, seq), np.int32)], NamedSharding(mesh, batch_spec(mesh)))
    tables = batch_tables(mesh, model.config.rope, model.dtype, windows(model.config))(mask)
    total = 0.0
    for _, step, state in programs:
        cost = step.lower(state, x, mask, tables).compile().cost_analysis()
        total += (cost[0] if isinstance(cost, list) else cost)["flops"]
    return total


def test_expert_mesh_does_not_repeat_attention(hf_models):
    """With the all-experts ``dense`` dispatch (no data-dependent loop, so XLA counts every flop), a
    device's work is about 1/8 of one device's on every 8-device mesh: (E / X experts) x (X gathered
    rows) for the experts, its own rows for attention and dense layers; only the statistics' passes
    over the gathered (token, expert) pairs grow with X (measured 1.07, 1.14, 1.25 x 1/8). Attention
    repeated over the expert axis (or replicated) would multiply its flops, about a third of the
    step here, by X (or 8)."""
    model = mone_jax.load_hf(hf_models("olmoe", "a")[0], progress=False)
    model.impl = "dense"
    share = step_flops(model, (1, 1)) / 8
    for shape in [(8, 1), (2, 4), (1, 8)]:
        assert step_flops(model, shape) < 1.4 * share, shape


def test_param_specs_split_only_routed_experts(hf_models):
    model = mone_jax.load_hf(hf_models("qwen2_moe", "b")[0], progress=False)

    specs = nnx.to_flat_state(param_specs(nnx.state(model)))  # by variable type: ExpertParam, ExpertBuffer
    split = {".".join(map(str, path)) for path, v in specs if v.get_value() == P("expert")}
    assert split == {f"layers.{i}.mlp.{n}" for i in (1, 2) for n in ("gate_up", "down", "kept_ids")}


def test_mesh_shape_choices_and_errors():
    assert mesh_shape("data=4,expert=2", 8, 8) == (4, 2)
    assert mesh_shape("expert=2", 8, 8) == (4, 2) and mesh_shape("data=2", 8, 8) == (2, 4)
    assert mesh_shape("auto", 8, 8) == (8, 1)  # no device memory known (CPU): data parallel
    # auto with a device memory: the smallest expert split for which the parameters fit 70% of it
    assert mesh_shape("auto", 8, 16, param_bytes=(4, 100), device_bytes=50) == (2, 4)
    assert mesh_shape("data=2,expert=4", 8, 6) == (2, 4)  # 6 experts padded to 8 rows
    assert mesh_shape("auto", 8, 6, param_bytes=(4, 60), device_bytes=50) == (4, 2)  # 3 of 6 experts: 34 <= 35
    for spec, experts, msg in [("data=3,expert=2", 8, "needs 6 devices"), ("expert=3", 9, "cannot be derived"),
                               ("model=2", 8, "bad --mesh"), ("data=0", 8, "bad --mesh"), ("data=x", 8, "bad --mesh")]:
        with pytest.raises(UserError, match=msg):
            mesh_shape(spec, 8, experts)
    with pytest.raises(UserError, match="does not fit"):
        mesh_shape("auto", 8, 8, param_bytes=(100, 100), device_bytes=50)
