"""Forward parity with transformers beyond the per-family check (tests/test_families.py): padding, bf16,
sharded and fused checkpoints, scaled RoPE, refusals, one compilation per shape."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import assert_close_logits, rewrite_config, torch, torch_logits
from safetensors.torch import save_file

import mone_jax
from mone_jax.base.errors import UserError


def _ids(vocab: int, shape=(2, 12), seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_right_padding_matches_transformers(hf_models, family):
    folder, hf = hf_models(family, "b")
    model = mone_jax.load_hf(folder, progress=False)
    ids = _ids(hf.config.vocab_size, (3, 10))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ours, ref = np.asarray(model(ids, attention_mask=mask)), torch_logits(hf, ids, mask)
    keep = mask.astype(bool)
    assert_close_logits(ours[keep], ref[keep])


def test_sharded_checkpoint_loads(hf_models, tmp_path):
    _, hf = hf_models("qwen2_moe", "a")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ids = _ids(hf.config.vocab_size)
    assert_close_logits(mone_jax.load_hf(tmp_path, progress=False)(ids), torch_logits(hf, ids))


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_fused_expert_checkpoint_loads(hf_models, tmp_path, family):
    """transformers 5 keeps experts fused in memory: write that state dict as-is (gate_up [E, 2f, d])."""
    folder, hf = hf_models(family, "a")
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    if family == "mixtral":  # on disk Mixtral's MoE module is block_sparse_moe
        sd = {k.replace(".mlp.", ".block_sparse_moe."): v for k, v in sd.items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    ids = _ids(hf.config.vocab_size)
    assert_close_logits(mone_jax.load_hf(tmp_path, progress=False)(ids), torch_logits(hf, ids))


def test_qwen3_config_with_num_experts_key(hf_models, tmp_path):
    folder, hf = hf_models("qwen3_moe", "a")
    shutil.copytree(folder, tmp_path / "m")
    rewrite_config(tmp_path / "m", num_experts=hf.config.num_experts, num_local_experts=None)
    ids = _ids(hf.config.vocab_size)
    assert_close_logits(mone_jax.load_hf(tmp_path / "m", progress=False)(ids), torch_logits(hf, ids))


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_bf16_within_tolerance(hf_models, family):
    folder, hf = hf_models(family, "a")
    ids = _ids(hf.config.vocab_size)
    ref = np.asarray(mone_jax.load_hf(folder, progress=False)(ids))
    m16 = mone_jax.load_hf(folder, dtype="bfloat16", progress=False)
    assert m16.embed[...].dtype == np.dtype("bfloat16")
    out = np.asarray(m16(ids), np.float32)
    assert np.isfinite(out).all()
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < 3e-2, rel  # bf16 has 8 mantissa bits: ~0.4% per op, a few ops deep


def test_scaled_rope_variants_match(tmp_path):
    """Scaled RoPE variants against transformers (Qwen3-MoE with yarn, Mixtral with linear, and with longrope
    past its original length: long factors and the default attention factor)."""
    import transformers as T
    from conftest import COMMON
    for name, cls, rope, extra in [
        ("yarn", T.Qwen3MoeConfig, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                                    "rope_theta": 10000.0}, {}),
        ("linear", T.MixtralConfig, {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, {}),
        ("longrope", T.MixtralConfig, {"rope_type": "longrope", "original_max_position_embeddings": 8,
                                       "rope_theta": 10000.0, "short_factor": [1.0, 1.2, 1.5, 2.0],
                                       "long_factor": [1.5, 3.0, 6.0, 11.0]}, {"head_dim": 8}),
    ]:
        cfg = cls(**{**COMMON, "intermediate_size": 16, "moe_intermediate_size": 16, "num_hidden_layers": 1,
                     "num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2, "rope_parameters": rope,
                     **extra})
        torch.manual_seed(0)
        hf = T.AutoModelForCausalLM.from_config(cfg).eval()
        hf.save_pretrained(tmp_path / name)
        ids = _ids(cfg.vocab_size, (2, 16))
        assert_close_logits(mone_jax.load_hf(tmp_path / name, progress=False)(ids), torch_logits(hf, ids))


def test_unsupported_rope_type_is_refused(hf_models, tmp_path):
    folder, _ = hf_models("olmoe", "a")
    shutil.copytree(folder, tmp_path / "m")
    rewrite_config(tmp_path / "m", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(UserError, match="rope type 'dynamic' is not supported"):
        mone_jax.load_hf(tmp_path / "m", progress=False)


def test_pickle_only_checkpoint_is_refused(hf_models, tmp_path):
    folder, _ = hf_models("olmoe", "a")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(UserError, match="pickle"):
        mone_jax.load_hf(tmp_path, progress=False)


def test_forward_is_jitted_once_per_shape(hf_models):
    from mone_jax.model.causal_lm import _forward

    folder, hf = hf_models("olmoe", "a")
    model = mone_jax.load_hf(folder, progress=False)
    before = _forward._cache_size()
    for seed in range(3):
        model(_ids(hf.config.vocab_size, (2, 13), seed=seed))
    assert _forward._cache_size() == before + 1
