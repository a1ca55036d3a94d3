"""Calibration beyond the per-family check (tests/test_families.py): weights-only metrics, batch splits and
dispatch implementations against the float64 loop; the statistics file; the default batch size."""

from __future__ import annotations

import numpy as np
import pytest
from checks import assert_close, assert_stats_match
from reference import (
    WEIGHT_METRICS_F64,
    experts_modules,
    reference_stats,
)

import mone_jax
from mone_jax.base.stats import Stats
from mone_jax.convert.criteria import weight_scores
from mone_jax.pruning.scoring import REGISTRY


@pytest.mark.parametrize("family,variant", [("qwen2_moe", "b"), ("gpt_oss", "a")])  # split and interleaved gate/up
def test_weight_metrics_match_float64_reference(hf_models, family, variant):
    """Every weights-only metric of the registry equals its float64 formula on transformers' expert weights."""
    folder, hf = hf_models(family, variant)
    names = {k for k, m in REGISTRY.items() if m.needs_weights}
    assert not (lacking := names - set(WEIGHT_METRICS_F64)), f"metrics without a float64 formula: {lacking}"
    for name in names:
        got = weight_scores(folder, name, progress=False)
        for i, mod in experts_modules(hf).items():
            assert_close(got[i], [WEIGHT_METRICS_F64[name](mod, e) for e in range(mod.num_experts)], f"layer {i} {name}")


@pytest.mark.parametrize("impl", ["scan", pytest.param("ragged", marks=pytest.mark.slow),
                                  pytest.param("dense", marks=pytest.mark.slow)])
def test_batch_split_and_impl_do_not_change_stats(hf_models, impl):
    """Merge correctness: the same tokens as 1 batch, or 3 batches of different sizes, give equal stats."""
    folder, hf = hf_models("qwen2_moe", "b")
    model = mone_jax.load_hf(folder, progress=False)
    model.impl = impl
    ids = np.random.default_rng(5).integers(0, hf.config.vocab_size, (6, 16)).astype(np.int32)
    whole = mone_jax.calibrate(model, [ids], progress=False)
    parts = mone_jax.calibrate(model, [ids[:1], ids[1:4], ids[4:]], progress=False)
    ref, tokens = reference_stats(hf, [(ids, None)])
    assert_stats_match(whole, ref, tokens)
    split, _ = reference_stats(hf, [(ids[:1], None), (ids[1:4], None), (ids[4:], None)])  # ref_*: one call a batch
    assert_stats_match(parts, split, tokens)


def test_stats_file_roundtrip(hf_models, tmp_path):
    folder, hf = hf_models("olmoe", "a")
    model = mone_jax.load_hf(folder, progress=False)
    stats = mone_jax.calibrate(model, [np.arange(24, dtype=np.int32).reshape(2, 12) % hf.config.vocab_size],
                               progress=False)
    stats.save(tmp_path / "s.safetensors")
    back = Stats.load(tmp_path / "s.safetensors")
    assert back.tokens == stats.tokens and back.meta["model_type"] == "olmoe"
    assert back.meta["num_experts"] == str(hf.config.num_experts)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "s.safetensors"), "numpy") as f:
        assert f.metadata()["format_version"] == "1"
        assert f.get_tensor("layers.0.count").dtype == np.int64
        assert f.get_tensor("layers.0.output_mean").dtype == np.float32
    for i in stats.layers:
        np.testing.assert_array_equal(back.layers[i].count, stats.layers[i].count)
        np.testing.assert_allclose(back.layers[i].m2, stats.layers[i].m2, rtol=1e-6)


def test_default_batch_size_follows_the_model_and_memory():
    """About 4096 tokens per device; enough tokens for 256 routed rows per expert when experts are many; a tenth of
    the memory at most; a multiple of the data-parallel devices."""
    from types import SimpleNamespace

    from mone_jax.calib.calibration import default_batch_size

    def cfg(E, k):  # the fields the rule reads
        return SimpleNamespace(num_experts=E, top_k=k, hidden_size=512, shared_expert_intermediate_size=0)

    assert default_batch_size(cfg(32, 4), 512) == 8 and default_batch_size(cfg(32, 4), 64) == 64
    assert default_batch_size(cfg(256, 8), 512) == 16  # 256 * 256 / 8 = 8192 tokens
    assert default_batch_size(cfg(32, 4), 512, devices=4) == 32
    per_seq = 4 * (12 * 512 + 32 + 8 * 4) * 512
    assert default_batch_size(cfg(32, 4), 512, memory_bytes=10 * 3 * per_seq) == 3  # a tenth of it holds 3
    assert default_batch_size(cfg(32, 4), 512, devices=2, memory_bytes=10 * 3 * per_seq) == 6  # 3 each, even
    assert default_batch_size(cfg(32, 4), 512, memory_bytes=1.0) == 1
