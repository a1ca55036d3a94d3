"""Qwen3-Next / Qwen3.5-MoE beyond the shared table: the chunked Gated DeltaNet scan against a float64
step-by-step recurrence, logits with every norm, decay and gate perturbed away from its initial value
(padding on either side, several chunks), and the text model of a multimodal Qwen3.5-MoE checkpoint."""

from __future__ import annotations

import json
from functools import partial

import jax
import numpy as np
import pytest
from conftest import COMMON, CONFIGS, assert_close_logits, build_hf, torch, torch_logits, transformers
from safetensors import safe_open

import mone_jax
from mone_jax.app.describe import summarize
from mone_jax.convert.export import export_pruned
from mone_jax.model.deltanet import chunked_gated_delta_rule


def recurrence64(q, k, v, g, beta, state):
    """The gated delta rule token by token in float64 (the definition; no chunking)."""
    q, k, v, g, beta, s = (np.asarray(a, np.float64) for a in (q, k, v, g, beta, state))
    B, T, H, _ = q.shape
    s = s.copy()
    out = np.zeros((*q.shape[:3], v.shape[-1]))
    for b in range(B):
        for h in range(H):
            for t in range(T):
                s[b, h] *= np.exp(g[b, t, h])
                err = v[b, t, h] - s[b, h].T @ k[b, t, h]
                s[b, h] += beta[b, t, h] * np.outer(k[b, t, h], err)
                out[b, t, h] = s[b, h].T @ q[b, t, h]
    return out, s


@pytest.mark.parametrize("T,chunk", [(1, 64), (13, 4), (37, 16), (40, 64)])
def test_chunked_scan_equals_float64_recurrence(T, chunk):
    rng = np.random.default_rng(T)
    B, H, Dk, Dv = 2, 3, 8, 6

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q = unit(rng.normal(size=(B, T, H, Dk))) * Dk**-0.5
    k = unit(rng.normal(size=(B, T, H, Dk)))
    v = rng.normal(size=(B, T, H, Dv))
    g = -rng.exponential(0.5, size=(B, T, H))  # log decays <= 0, some near 0
    beta = rng.uniform(0.0, 1.0, size=(B, T, H))
    s0 = rng.normal(0.0, 0.5, size=(B, H, Dk, Dv))
    f32 = [np.float32(a) for a in (q, k, v, g, beta, s0)]
    o, s = jax.jit(partial(chunked_gated_delta_rule, chunk=chunk))(*f32[:5], f32[5])
    ref_o, ref_s = recurrence64(q, k, v, g, beta, s0)
    np.testing.assert_allclose(np.asarray(o), ref_o, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s), ref_s, rtol=0, atol=1e-5)
    assert np.abs(ref_o).max() > 0.1  # the comparison is not of near-zero outputs


def _live(model, seed: int = 3):
    """Every RMSNorm weight, DeltaNet decay (A_log, dt_bias) and conv tap moved off its initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith(("norm.weight", "A_log", "dt_bias", "conv1d.weight")):
                t.add_(torch.randn(t.shape, generator=gen) * 0.3)
    return model


def test_logits_with_padding_over_several_chunks(tmp_path):
    """70 tokens (two DeltaNet chunks), one row right-padded, one left-padded: valid positions match (the
    multimodal test below runs Qwen3.5's projections with live norms)."""
    hf = _live(build_hf("qwen3_next", "a"))
    hf.save_pretrained(tmp_path)
    ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, (3, 70)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 50:] = 0
    mask[2, :9] = 0
    ours = np.asarray(mone_jax.load_hf(tmp_path, progress=False)(ids, attention_mask=mask))
    keep = mask.astype(bool)
    assert_close_logits(ours[keep], torch_logits(hf, ids, mask)[keep])


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """A tiny Qwen3.5-MoE vision-language checkpoint (vision tower + the text table's qwen3_5_moe_text)."""
    text = {**COMMON, **CONFIGS[("qwen3_5_moe_text", "a")][1]}
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=COMMON["hidden_size"],
                  patch_size=4, num_position_embeddings=16)
    cfg = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    hf = _live(transformers.Qwen3_5MoeForConditionalGeneration(cfg).eval())
    folder = tmp_path_factory.mktemp("qwen3_5_moe_vl")
    hf.save_pretrained(folder)
    return folder, hf


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*multimodal qwen3_5_moe checkpoint")
def test_multimodal_checkpoint_reads_its_text_model(multimodal, tmp_path):
    folder, hf = multimodal
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        assert any(k.startswith("model.visual.") for k in f.keys())
    ids = np.random.default_rng(1).integers(0, 96, (2, 12)).astype(np.int32)
    ref = torch_logits(hf, ids)
    assert_close_logits(mone_jax.load_hf(folder, progress=False)(ids), ref)
    summary = summarize(folder)  # the text model's tensors only
    assert summary["model_type"] == "qwen3_5_moe_text"
    assert summary["params_total"] == sum(p.numel() for n, p in hf.named_parameters() if ".visual." not in n)

    # the streamed export writes the pruned text model alone, which transformers loads as Qwen3_5MoeForCausalLM
    E = hf.config.text_config.num_experts
    plan = {"metric": "mone", "scope": "layer", "keep": 5, "layers": {
        str(i): {"kept": [0, 2, 3, 5, 7], "novices": [1, 4, 6], "scores": [0.0] * E} for i in range(2)}}
    rng = np.random.default_rng(2)
    novices = {i: {e: rng.normal(size=COMMON["hidden_size"]).astype(np.float32) for e in (1, 4, 6)} for i in range(2)}
    out = tmp_path / "pruned"
    export_pruned(folder, out, plan, novices, fmt="substitution")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe_text" and "vision_config" not in config
    with safe_open(str(out / "model.safetensors"), "np") as f:
        keys = list(f.keys())
    assert not any("visual" in k or "language_model" in k for k in keys)
    pruned_ref = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(pruned_ref).__name__ == "MoneQwen3_5MoeForCausalLM"
    pruned = np.asarray(mone_jax.load_hf(out, progress=False)(ids))
    assert_close_logits(pruned, torch_logits(pruned_ref, ids))
    assert np.abs(pruned - ref).max() > 1e-3  # the novices changed the model


@pytest.mark.slow
def test_greedy_generate_matches_transformers(hf_models):
    """Prefill with left padding, then one token at a time from the DeltaNet's conv and recurrent state, as
    transformers' own generate (its recurrent torch path) decodes."""
    folder, hf = hf_models("qwen3_next", "a")
    prompts = [[5, 17, 3, 88, 41, 9, 60], [7, 2, 31]]
    ours = mone_jax.generate(mone_jax.load_hf(folder, progress=False), prompts, max_new_tokens=6, eos_token_id=[])
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert got == ref[0, len(prompt):].tolist()


def test_inspect_counts_qwen3_next(hf_models):
    folder, hf = hf_models("qwen3_next", "a")
    s = summarize(folder)
    routed = sum(p.numel() for n, p in hf.named_parameters() if ".mlp.experts." in n)
    assert s["params_total"] == sum(p.numel() for p in hf.parameters())
    assert s["params_routed_experts"] == routed
    assert s["moe_layers"] == [0, 1] and s["dense_layers"] == [2]  # mlp_only_layers = [2]
