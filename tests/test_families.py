"""Every family of the shared table: fp32 logits against transformers and calibration statistics against the
float64 loop; the router parameters, quantized experts and refusals of the families that have them."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest
from checks import assert_stats_match, calib_batches
from conftest import (
    ALL_VARIANTS,
    PER_FAMILY,
    assert_close_logits,
    build_hf,
    rewrite_config,
    tiered,
    torch,
    torch_logits,
)
from reference import reference_stats
from safetensors.numpy import load_file, save_file

import mone_jax
from mone_jax.base.errors import UserError


def _ids(vocab: int, shape=(2, 12), seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("family,variant", tiered(ALL_VARIANTS, fast=PER_FAMILY))
def test_logits_and_stats_match_the_references(hf_models, family, variant):
    """Every variant of the shared table: logits against transformers' forward, and calibration statistics (with
    padding) against the float64 loop over the tokens transformers routed, every field and metric."""
    folder, hf = hf_models(family, variant)
    model = mone_jax.load_hf(folder, progress=False)
    ids = _ids(hf.config.vocab_size)
    assert_close_logits(model(ids), torch_logits(hf, ids))
    batches = calib_batches(hf.config.vocab_size, sizes=((2, 12), (2, 12)))  # one compiled shape
    ref, tokens = reference_stats(hf, batches)
    stats = mone_jax.calibrate(model, [{"input_ids": i, "attention_mask": m} for i, m in batches], progress=False)
    assert_stats_match(stats, ref, tokens)


def test_router_parameters_are_loaded(hf_models):
    """The score-correction bias (only chooses experts) and GPT-OSS router / expert biases reach the model."""
    folder, hf = hf_models("deepseek_v3", "grouped_yarn")
    blk = mone_jax.load_hf(folder, progress=False).moe_blocks()[1]
    np.testing.assert_array_equal(blk.score_bias[...], hf.model.layers[1].mlp.gate.e_score_correction_bias.numpy())
    assert blk.router[...].dtype == np.float32
    folder, hf = hf_models("gpt_oss", "a")
    blk = mone_jax.load_hf(folder, progress=False).moe_blocks()[0]
    np.testing.assert_array_equal(blk.router_bias[...], hf.model.layers[0].mlp.router.bias.detach().numpy())
    gu_bias = hf.model.layers[0].mlp.experts.gate_up_proj_bias.detach().numpy()
    np.testing.assert_array_equal(blk.gate_up_bias[...], np.concatenate([gu_bias[:, 0::2], gu_bias[:, 1::2]], -1))


@pytest.mark.parametrize("model_type", ["llama4", "llama4_text", "dbrx"])
def test_unsupported_family_is_refused(hf_models, tmp_path, model_type):
    folder, _ = hf_models("glm4_moe", "a")
    shutil.copytree(folder, tmp_path / "m")
    rewrite_config(tmp_path / "m", model_type=model_type)
    with pytest.raises(UserError, match=rf"'{model_type}' is not supported.*Supported: .*deepseek_v3.*gpt_oss"):
        mone_jax.load_hf(tmp_path / "m", progress=False)


def test_inconsistent_groups_are_refused(hf_models, tmp_path):
    folder, _ = hf_models("deepseek_v3", "grouped_yarn")
    shutil.copytree(folder, tmp_path / "m")
    rewrite_config(tmp_path / "m", n_group=3)
    with pytest.raises(UserError, match="n_group = 3"):
        mone_jax.load_hf(tmp_path / "m", progress=False)


def test_gpt_oss_mxfp4_experts_are_dequantized(tmp_path):
    """Released GPT-OSS checkpoints store experts as MXFP4 blocks + scales; transformers' own dequantizer
    gives the reference weights."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf = build_hf("gpt_oss", "a", intermediate_size=32)  # MXFP4 packs 32 input values per block
    hf.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    rng = np.random.default_rng(0)
    for i, layer in enumerate(hf.model.layers):
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{i}.mlp.experts.{name}"
            E, n_in, n_out = tensors.pop(key).shape
            blocks = rng.integers(0, 256, (E, n_out, n_in // 32, 16), dtype=np.uint8)
            scales = rng.integers(121, 126, (E, n_out, n_in // 32), dtype=np.uint8)
            tensors[f"{key}_blocks"], tensors[f"{key}_scales"] = blocks, scales
            getattr(layer.mlp.experts, name).data = convert_moe_packed_tensors(
                torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    rewrite_config(tmp_path, quantization_config={"quant_method": "mxfp4"})
    ids = _ids(hf.config.vocab_size)
    assert_close_logits(mone_jax.load_hf(tmp_path, progress=False)(ids), torch_logits(hf, ids))


def test_other_quantized_checkpoints_are_refused(hf_models, tmp_path):
    folder, _ = hf_models("deepseek_v3", "moonlight")
    shutil.copytree(folder, tmp_path / "m")
    rewrite_config(tmp_path / "m", quantization_config={"quant_method": "awq", "bits": 4})
    with pytest.raises(UserError, match=r"quantized checkpoints \(awq\) are not supported: mone-jax reads fp8 "):
        mone_jax.load_hf(tmp_path / "m", progress=False)


def test_page_cache_drop_loads_the_same_model(hf_models, monkeypatch):
    """When weights and files cannot both stay in memory, the loader drops every page it has read from the page
    cache (posix_fadvise DONTNEED after each pread): every byte of the files' tensors is dropped once, and the
    model is the normal load's, array for array."""
    from flax import nnx

    import mone_jax.convert.load as load
    from mone_jax.convert.reader import CheckpointReader

    folder, _ = hf_models("olmoe", "a")
    want = jax.tree.leaves(nnx.state(mone_jax.load_hf(folder, progress=False)))
    dropped, fadvise = [], os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_DONTNEED:
            dropped.append(length)
        fadvise(fd, offset, length, advice)

    monkeypatch.setattr(load, "_memory_short", lambda folder, model: True)
    monkeypatch.setattr(os, "posix_fadvise", spy)
    got = jax.tree.leaves(nnx.state(mone_jax.load_hf(folder, progress=False)))
    with CheckpointReader(folder) as r:
        stored = sum(int(np.prod(r.stored.shape(k))) * r.stored.dtype(k).itemsize for k in r.stored.keys())
    assert sum(dropped) == stored
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_keeps_router_in_float32(hf_models):
    """bf16 weights, with the DeepSeek router weight and score bias kept (and applied) in float32 as
    transformers does, so routing stays close to float32's."""
    folder, hf = hf_models("deepseek_v3", "grouped_yarn")
    ids = _ids(hf.config.vocab_size)
    ref = torch_logits(hf, ids)
    m16 = mone_jax.load_hf(folder, dtype="bfloat16", progress=False)
    blk = m16.moe_blocks()[1]
    assert blk.gate_up[...].dtype == np.dtype("bfloat16")
    assert blk.router[...].dtype == blk.score_bias[...].dtype == np.dtype("float32")
    out = np.asarray(m16(ids), np.float32)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 3e-2
