"""Pruned checkpoints in the substitution and mode-pd layouts load in JAX as pruned models.

Round trip (every family, substitution and drop): calibrate -> plan -> prune in JAX, whose logits equal an
independent PyTorch application of the plan (tests/torch_apply.py) -> export -> transformers loads the export
(trust_remote_code, our bundled modeling file) and ``mone_jax.load_hf`` loads it back; all logits agree. Cross-framework: a mode-pd checkpoint written here from a transformers model
whose experts this test replaced itself loads in JAX and matches that PyTorch model.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import PER_FAMILY, assert_close_logits, build_hf, tiered, torch, torch_logits
from safetensors.numpy import load_file, save_file
from torch_apply import drop, substitute

import mone_jax
from mone_jax.base.errors import UserError
from mone_jax.convert.formats import torch_model

# (family, variant, keep, format): drop mode needs keep to split into the router's groups.
_CHOSEN = [
    *[(f, v, k, "substitution") for f, v, k in [("deepseek_v2", "group_yarn", 4), ("deepseek_v3", "grouped_yarn", 8),
                                                 ("glm4_moe", "a", 4), ("gpt_oss", "a", 4)]],
    *[(f, v, k, "modepd") for f, v, k in [("deepseek_v3", "moonlight", 5), ("gpt_oss", "a", 3)]],
    ("mixtral", "b", 5, "substitution"), ("qwen2_moe", "b", 4, "modepd"),  # block_sparse_moe; shared-expert gate
    *[(f, v, k, "drop") for f, v, k in [("deepseek_v2", "lora_greedy", 4), ("deepseek_v3", "grouped_yarn", 8),
                                         ("glm4_moe", "a", 4), ("gpt_oss", "a", 4)]],
]
# every other family of the shared table: a substitution and a drop round trip (keep chosen from its config)
CASES = _CHOSEN + [(f, v, None, fmt) for f, v in PER_FAMILY if f not in {c[0] for c in _CHOSEN}
                   for fmt in ("substitution", "drop")] + [
    ("olmoe", "b", None, "substitution"), ("mixtral", "b", None, "drop"), ("qwen2_moe", "b", None, "drop")]
REL = 1e-5


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(family, variant) -> (folder, torch model, JAX model, stats)."""
    cache: dict = {}

    def get(family: str, variant: str):
        if (family, variant) not in cache:
            hf = build_hf(family, variant)
            folder = tmp_path_factory.mktemp(f"src_{family}_{variant}")
            hf.save_pretrained(folder)
            model = mone_jax.load_hf(folder, progress=False)
            model.impl = "dense"  # compiles fastest; dispatch itself is tested elsewhere
            ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, (4, 16)).astype(np.int32)
            cache[(family, variant)] = (folder, hf, model, mone_jax.calibrate(model, [ids], progress=False))
        return cache[(family, variant)]

    return get


def _ids(vocab: int) -> np.ndarray:
    return np.random.default_rng(3).integers(0, vocab, (2, 12)).astype(np.int32)


def _close(ours, ref, rel: float = REL) -> None:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    err = np.abs(ours - ref).max()
    assert err <= rel * np.abs(ref).max(), f"max|diff| {err:.3g} vs max|ref| {np.abs(ref).max():.3g}"


@pytest.mark.parametrize("family,variant,keep,fmt", tiered(CASES))
def test_export_and_import_roundtrip(sources, tmp_path, family, variant, keep, fmt):
    folder, hf, model, stats = sources(family, variant)
    cfg = model.config
    groups = cfg.n_group if fmt == "drop" else 1
    keep = keep or -(-cfg.num_experts // (2 * groups)) * groups  # about half, the same number in every group
    plan = mone_jax.plan(stats, keep=keep, n_group=groups)
    pruned = mone_jax.prune(model, stats, plan, mode="drop" if fmt == "drop" else "substitute")
    out = tmp_path / f"{family}_{variant}_{fmt}"  # unique: transformers caches remote code by folder name
    mone_jax.save_hf(pruned, out, format=fmt, source=folder)
    ids = _ids(hf.config.vocab_size)
    ours = np.asarray(pruned(ids))
    # an independent PyTorch application of the plan (tests/torch_apply.py), then the export in transformers
    novices = {i: {e: stats.layers[i].mean[e].astype(np.float32) for e in lp.novices} for i, lp in plan.layers.items()}
    independent = drop(hf, plan.to_dict()) if fmt == "drop" else substitute(hf, plan.to_dict(), novices)
    _close(ours, torch_logits(independent, ids))
    assert np.abs(ours - torch_logits(hf, ids)).max() > 1e-6  # pruning really changed something
    theirs = torch_model(out).eval()
    _close(ours, torch_logits(theirs, ids))
    back = mone_jax.load_hf(out, progress=False)
    back.impl = "dense"
    _close(back(ids), ours)
    if fmt == "drop":  # a stock checkpoint with fewer experts
        assert back.config.num_experts == keep and not any(b.novice_ids.shape[0] for b in back.moe_blocks().values())
        return
    for i, blk in pruned.moe_blocks().items():
        got = back.moe_blocks()[i]
        assert got.num_kept == blk.num_kept == keep
        for name in ("kept_ids", "novice_ids", "novice_values", "gate_up", "gate_up_bias", "down_bias"):
            if getattr(blk, name) is not None:
                np.testing.assert_array_equal(getattr(got, name)[...], getattr(blk, name)[...], err_msg=name)


def _replace_experts(hf, novices: dict[int, dict[int, np.ndarray]]) -> None:
    """In place, in PyTorch: each novice e of layer l outputs ``weight * novices[l][e]`` instead of its MLP."""
    for layer, values in novices.items():
        experts = hf.model.layers[layer].mlp.experts
        stock = experts.forward
        table = torch.zeros(experts.num_experts, hf.config.hidden_size)
        is_novice = torch.zeros(experts.num_experts, dtype=torch.bool)
        for e, v in values.items():
            table[e], is_novice[e] = torch.as_tensor(v), True

        def forward(hidden, index, weights, stock=stock, table=table, is_novice=is_novice):
            nov = is_novice[index]
            out = stock(hidden, index, weights.masked_fill(nov, 0.0))  # retained experts only
            return out + ((weights * nov)[..., None] * table[index]).sum(1).to(out.dtype)

        experts.forward = forward


def _write_modepd(src, out, novices: dict[int, dict[int, np.ndarray]]) -> None:
    """The mode-pd layout by hand: novices' weights removed, ``experts.<e>.approx_value`` added, retained
    experts under their original ids, config ``approximate_experts`` and a ``*_compressed`` model type."""
    shutil.copytree(src, out)
    tensors = load_file(str(src / "model.safetensors"))
    for layer, values in novices.items():
        for e, v in values.items():
            pre = f"model.layers.{layer}.mlp.experts.{e}."
            tensors = {k: t for k, t in tensors.items() if not k.startswith(pre)}
            tensors[pre + "approx_value"] = v
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] += "_compressed"
    cfg["approximate_experts"] = {str(layer): sorted(values) for layer, values in novices.items()}
    (out / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("family,variant", [("deepseek_v2", "lora_greedy"), ("deepseek_v3", "moonlight")])
def test_modepd_written_from_torch_matches_torch(tmp_path, family, variant):
    hf = build_hf(family, variant, seed=4)
    hf.save_pretrained(tmp_path / "src")
    rng = np.random.default_rng(0)
    layers = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    E = hf.config.n_routed_experts
    novices = {layer: {int(e): rng.normal(0, 0.5, hf.config.hidden_size).astype(np.float32)
                       for e in rng.choice(E, 3 + i, replace=False)} for i, layer in enumerate(layers)}
    _write_modepd(tmp_path / "src", tmp_path / "modepd", novices)
    ids = _ids(hf.config.vocab_size)
    before = torch_logits(hf, ids)
    _replace_experts(hf, novices)
    ref = torch_logits(hf, ids)
    assert np.abs(ref - before).max() > 1e-2  # the replacement matters
    model = mone_jax.load_hf(tmp_path / "modepd", progress=False)
    assert {i: b.num_kept for i, b in model.moe_blocks().items()} == {i: E - len(v) for i, v in novices.items()}
    assert_close_logits(model(ids), ref)


def test_bad_pruned_configs_are_refused(sources, tmp_path):
    folder, hf, model, stats = sources("deepseek_v3", "moonlight")
    mone_jax.save_hf(mone_jax.prune(model, stats, mone_jax.plan(stats, keep=5)), tmp_path / "sub",
                     format="substitution", source=folder)
    cfg_path = tmp_path / "sub" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    block = cfg["compression_config"]["transform_config"]["expert_substitution"]
    block["router_semantics"]["renormalize_after_substitution"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="renormali"):
        mone_jax.load_hf(tmp_path / "sub", progress=False)
    block["router_semantics"]["renormalize_after_substitution"] = False
    target = next(iter(block["targets"].values()))
    target["replacements"]["99"] = next(iter(target["replacements"].values()))
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="expert ids must lie in"):
        mone_jax.load_hf(tmp_path / "sub", progress=False)
    del target["replacements"]["99"]
    rep = next(iter(target["replacements"].values()))
    rep["tensors"]["value"] = "model.layers.1.mlp.expert_replacements.no_such.value"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="no_such.*missing"):
        mone_jax.load_hf(tmp_path / "sub", progress=False)
