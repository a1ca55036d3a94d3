"""The pruning transform: pruned JAX model against an independent PyTorch application of the plan."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FAMILY_VARIANTS, assert_close_logits, torch_logits
from flax import nnx
from torch_apply import drop, substitute

import mone_jax
from mone_jax.errors import UserError
from mone_jax.pruning import prune_params


def _calib(hf, model, seed=0):
    rng = np.random.default_rng(seed)
    return mone_jax.calibrate(model, [rng.integers(0, hf.config.vocab_size, (4, 16)).astype(np.int32)],
                              progress=False)


def _novices(stats, plan):
    return {int(k): {e: stats.layers[int(k)].mean[e].astype(np.float32) for e in v["novices"]}
            for k, v in plan["layers"].items()}


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(9).integers(0, 96, (2, 12)).astype(np.int32)


def test_keep_all_is_identical(hf_models, ids):
    folder, hf = hf_models("qwen2_moe", "a")
    model = mone_jax.load_hf(folder, progress=False)
    stats = _calib(hf, model)
    pruned = mone_jax.prune(model, stats, mone_jax.plan(stats, keep=hf.config.num_experts))
    np.testing.assert_array_equal(np.asarray(pruned(ids)), np.asarray(model(ids)))


@pytest.mark.parametrize("family,variant", FAMILY_VARIANTS)
def test_pruned_matches_independent_torch(hf_models, ids, family, variant):
    folder, hf = hf_models(family, variant)
    model = mone_jax.load_hf(folder, progress=False)
    stats = _calib(hf, model)
    E, k = model.config.num_experts, model.config.top_k
    plan = mone_jax.plan(stats, keep=max(k, E // 2))
    ours = np.asarray(mone_jax.prune(model, stats, plan)(ids))
    assert_close_logits(ours, torch_logits(substitute(hf, plan, _novices(stats, plan)), ids))
    assert np.abs(ours - np.asarray(model(ids))).max() > 1e-6  # pruning really changed something
    ours_drop = np.asarray(mone_jax.prune(model, stats, plan, mode="drop")(ids))
    assert_close_logits(ours_drop, torch_logits(drop(hf, plan), ids))


def test_prune_params_shapes_and_novices(hf_models):
    folder, hf = hf_models("olmoe", "a")
    model = mone_jax.load_hf(folder, progress=False)
    stats = _calib(hf, model)
    plan = mone_jax.plan(stats, keep=3, metric="frequency")
    params = nnx.to_pure_dict(nnx.state(model))
    new = prune_params(params, stats, plan)
    for key, v in plan["layers"].items():
        blk, old = new["layers"][int(key)]["mlp"], params["layers"][int(key)]["mlp"]
        assert blk["gate_up"].shape[0] == 3 and blk["down"].shape[0] == 3
        np.testing.assert_array_equal(blk["gate_up"], np.asarray(old["gate_up"])[v["kept"]])
        np.testing.assert_array_equal(blk["novice_ids"], v["novices"])
        np.testing.assert_allclose(blk["novice_values"], stats.layers[int(key)].mean[v["novices"]], rtol=1e-6)
        assert blk["router"] is old["router"]  # router unchanged
    assert params["layers"][0]["mlp"]["gate_up"].shape[0] == 8  # input untouched (pure function)


def test_bad_plans_are_refused(hf_models):
    folder, hf = hf_models("olmoe", "a")
    model = mone_jax.load_hf(folder, progress=False)
    stats = _calib(hf, model)
    plan = mone_jax.plan(stats, keep=3)
    bad = {**plan, "layers": {**plan["layers"], "0": {"kept": [0, 1], "novices": [1, 2, 3, 4, 5, 6, 7]}}}
    with pytest.raises(UserError, match="partition"):
        mone_jax.prune(model, stats, bad)
    with pytest.raises(UserError, match="layers"):
        mone_jax.prune(model, stats, {**plan, "layers": {"0": plan["layers"]["0"]}})
    uneven = {**plan, "layers": {**plan["layers"], "1": {"kept": [0], "novices": list(range(1, 8))}}}
    with pytest.raises(UserError, match="same keep count"):
        mone_jax.prune(model, stats, uneven, mode="drop")
    pruned = mone_jax.prune(model, stats, plan)
    with pytest.raises(UserError, match="already pruned"):
        mone_jax.calibrate(pruned, [np.zeros((1, 4), np.int32)], progress=False)


def test_drop_needs_keep_divisible_by_router_groups():
    from mone_jax.pruning import check_plan

    plan = {"layers": {"1": {"kept": [0, 1, 2], "novices": [3, 4, 5, 6, 7]}}}
    check_plan(plan, 8, [1], mode="drop", top_k=2, n_group=1)
    with pytest.raises(UserError, match="n_group = 2"):
        check_plan(plan, 8, [1], mode="drop", top_k=2, n_group=2)
