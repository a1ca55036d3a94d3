"""The pruning transform: keep-all identity, parameter shapes, refusals, grouped drop routing (every family's pruned
logits against an independent PyTorch application of the plan: tests/test_import_pruned.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from conftest import torch, torch_logits, transformers
from flax import nnx
from torch_apply import drop

import mone_jax
from mone_jax.base.errors import UserError
from mone_jax.pruning.transform import prune_params


def _calib(hf, model, seed=0):
    rng = np.random.default_rng(seed)
    return mone_jax.calibrate(model, [rng.integers(0, hf.config.vocab_size, (4, 16)).astype(np.int32)],
                              progress=False)


def _novices(stats, plan):
    return {i: {e: stats.layers[i].mean[e].astype(np.float32) for e in lp.novices} for i, lp in plan.layers.items()}


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(9).integers(0, 96, (2, 12)).astype(np.int32)


def test_keep_all_is_identical(hf_models, ids):
    folder, hf = hf_models("qwen2_moe", "a")
    model = mone_jax.load_hf(folder, progress=False)
    stats = _calib(hf, model)
    pruned = mone_jax.prune(model, stats, mone_jax.plan(stats, keep=hf.config.num_experts))
    np.testing.assert_array_equal(np.asarray(pruned(ids)), np.asarray(model(ids)))


def test_prune_params_shapes_and_novices(hf_models):
    folder, hf = hf_models("olmoe", "a")
    model = mone_jax.load_hf(folder, progress=False)
    stats = _calib(hf, model)
    plan = mone_jax.plan(stats, keep=3, metric="frequency")
    params = nnx.to_pure_dict(nnx.state(model))
    new = prune_params(params, stats, plan)
    for i, lp in plan.layers.items():
        blk, old = new["layers"][i]["mlp"], params["layers"][i]["mlp"]
        assert blk["gate_up"].shape[0] == 3 and blk["down"].shape[0] == 3
        np.testing.assert_array_equal(blk["gate_up"], np.asarray(old["gate_up"])[list(lp.kept)])
        np.testing.assert_array_equal(blk["novice_ids"], lp.novices)
        np.testing.assert_allclose(blk["novice_values"], stats.layers[i].mean[list(lp.novices)], rtol=1e-6)
        assert blk["router"] is old["router"]  # router unchanged
    assert params["layers"][0]["mlp"]["gate_up"].shape[0] == 8  # input untouched (pure function)


def test_bad_plans_are_refused(hf_models):
    folder, hf = hf_models("olmoe", "a")
    model = mone_jax.load_hf(folder, progress=False)
    stats = _calib(hf, model)
    plan = mone_jax.plan(stats, keep=3).to_dict()
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


# (family, variant, keep): group-limited routers, keep / n_group experts per group
GROUPED = [("deepseek_v3", "grouped_yarn", 8), ("glm4_moe", "a", 4)]


def _routes(model, ids: np.ndarray) -> dict[int, tuple]:
    """Per MoE layer of a transformers model: the router's input, chosen expert ids [T, k] and weights."""
    got, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "experts"):
            hooks.append(layer.mlp.gate.register_forward_hook(
                lambda mod, args, out, i=i: got.__setitem__(i, (args[0], out[2], out[1]))))
    torch_logits(model, ids)
    for h in hooks:
        h.remove()
    return got


def _routes_as_original_among_survivors(original, dropped, plan: dict, ids: np.ndarray) -> bool:
    """Whether each of ``dropped``'s routers picks, for the hidden states it sees, the experts (and weights)
    that the original router picks when the pruned experts may not be chosen (e_score_correction_bias -inf):
    the original group structure, only among the survivors."""
    for i, (hidden, idx, w) in _routes(dropped, ids).items():
        kept = torch.tensor(plan["layers"][str(i)]["kept"])
        gate = copy.deepcopy(original.model.layers[i].mlp.gate)
        with torch.no_grad():
            gate.e_score_correction_bias[[e for e in range(gate.num_experts) if e not in kept]] = -torch.inf
            _, w0, idx0 = gate(hidden)
        idx, order = torch.sort(kept[idx], dim=-1)
        idx0, order0 = torch.sort(idx0, dim=-1)
        if not torch.equal(idx, idx0) or not torch.allclose(w.gather(1, order), w0.gather(1, order0), atol=1e-6):
            return False
    return True


@pytest.mark.parametrize("family,variant,keep", GROUPED)
def test_grouped_drop_export_matches_torch_and_routes_among_survivors(hf_models, ids, tmp_path, family, variant,
                                                                       keep):
    folder, hf = hf_models(family, variant)
    model = mone_jax.load_hf(folder, progress=False)
    model.impl = "dense"
    stats = _calib(hf, model)
    cfg = model.config
    plan = mone_jax.plan(stats, keep=keep, n_group=cfg.n_group)
    size = cfg.num_experts // cfg.n_group
    for lp in plan.layers.values():  # the same number in every contiguous group of ids
        assert np.bincount(np.asarray(lp.kept) // size).tolist() == [keep // cfg.n_group] * cfg.n_group
    pruned = mone_jax.prune(model, stats, plan, mode="drop")
    out = tmp_path / f"drop_{family}_{variant}"
    mone_jax.save_hf(pruned, out, format="drop", source=folder)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ref = drop(hf, plan.to_dict())
    want = torch_logits(ref, ids)
    for got in (np.asarray(pruned(ids)), torch_logits(exported, ids)):
        err = np.abs(np.asarray(got, np.float64) - want).max()
        assert err <= 1e-5 * np.abs(want).max(), err
    assert _routes_as_original_among_survivors(hf, exported, plan.to_dict(), ids)
    # the check has teeth: keeping unequal numbers per group moves survivors into other groups
    naive = {"layers": {str(i): {"kept": list(range(keep)), "novices": list(range(keep, cfg.num_experts))}
                        for i in plan.layers}}
    assert not _routes_as_original_among_survivors(hf, drop(hf, naive), naive, ids)
    with pytest.raises(UserError, match="same number in every group"):
        mone_jax.prune(model, stats, naive, mode="drop")
