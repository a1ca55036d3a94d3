"""Tiny random Hugging Face MoE models built with transformers, saved as real checkpoints."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

# 8 CPU devices for the mesh tests; XLA:CPU's LLVM at -O0 and its LLVM IR fusion emitters instead of the newer
# MLIR ones, whose compile time dominates at this size: the tiny test programs compile ~3x faster and the suite
# spends ~35% less CPU. Every check compares against an independent reference, not against an optimised build.
COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                 "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 " + COMPILE_FLAGS)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one persistent compilation cache per test run, shared by the xdist workers and the CLI subprocesses they start
os.environ.setdefault("MONE_JAX_COMPILE_CACHE", os.path.join(
    tempfile.gettempdir(), "mone-jax-tests-xla-" + os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))))
# Programs that compile in under a second are not written: two suite runs crashed with a segfault inside JAX's
# persistent cache (serializing / deserializing a CPU executable, jaxlib 0.10.2) while it held every program.
os.environ.setdefault("MONE_JAX_COMPILE_CACHE_MIN_SECS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from mone_jax.base.compile_cache import configure  # noqa: E402

configure()  # this process's compilations use it too

# Property tests: a small profile for the suite; HYPOTHESIS_PROFILE=thorough for a deeper search.
settings.register_profile("ci", max_examples=30, deadline=None)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def __getattr__(name: str):
    """``from conftest import torch, transformers``: imported on first use, so a test module that needs them is
    skipped where they are missing while the torch-free core tests still run."""
    if name in ("torch", "transformers"):
        return pytest.importorskip(name)
    raise AttributeError(name)

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
              max_position_embeddings=256, tie_word_embeddings=False)

# THE table of tiny test configs: (family, variant) -> (transformers config class, kwargs), used by every
# cross-check. Variants cover: experts/top-k, norm_topk_prob, shared experts, dense layers mixed in, GQA vs
# MHA, sliding window, qkv clipping, MLA with and without low-rank queries, group-limited / sigmoid routing,
# scaling factors, scaled RoPE, attention sinks, expert biases.
CONFIGS: dict[tuple[str, str], tuple[str, dict]] = {
    ("olmoe", "a"): ("OlmoeConfig", dict(intermediate_size=16, num_hidden_layers=2, num_experts=8,
                                         num_experts_per_tok=2, norm_topk_prob=False)),
    ("olmoe", "b"): ("OlmoeConfig", dict(intermediate_size=24, num_hidden_layers=2, num_experts=4,
                                         num_experts_per_tok=3, norm_topk_prob=True, num_key_value_heads=4,
                                         clip_qkv=0.5)),
    ("qwen2_moe", "a"): ("Qwen2MoeConfig", dict(intermediate_size=40, moe_intermediate_size=16,
                                                shared_expert_intermediate_size=24, num_hidden_layers=3,
                                                num_experts=6, num_experts_per_tok=2, decoder_sparse_step=2)),
    ("qwen2_moe", "b"): ("Qwen2MoeConfig", dict(intermediate_size=40, moe_intermediate_size=16,
                                                shared_expert_intermediate_size=24, num_hidden_layers=3,
                                                num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
                                                mlp_only_layers=[0])),
    ("qwen3_moe", "a"): ("Qwen3MoeConfig", dict(intermediate_size=40, moe_intermediate_size=16, head_dim=16,
                                                num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                                                norm_topk_prob=True)),
    ("qwen3_moe", "b"): ("Qwen3MoeConfig", dict(intermediate_size=40, moe_intermediate_size=16, head_dim=8,
                                                num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                                                norm_topk_prob=False, mlp_only_layers=[1])),
    ("mixtral", "a"): ("MixtralConfig", dict(intermediate_size=16, num_hidden_layers=2, num_local_experts=4,
                                             num_experts_per_tok=2)),
    ("mixtral", "b"): ("MixtralConfig", dict(intermediate_size=16, num_hidden_layers=2, num_local_experts=8,
                                             num_experts_per_tok=2, sliding_window=5, num_key_value_heads=1)),
}
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
            intermediate_size=40, moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1)
_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16)
CONFIGS.update({
    ("deepseek_v2", "lora_greedy"): ("DeepseekV2Config", dict(
        **_MLA, num_hidden_layers=2, q_lora_rank=12, n_routed_experts=8, num_experts_per_tok=2,
        topk_method="greedy", routed_scaling_factor=2.0)),
    ("deepseek_v2", "group_yarn"): ("DeepseekV2Config", dict(
        **{**_MLA, "n_shared_experts": 2}, num_hidden_layers=3, q_lora_rank=None, n_routed_experts=8,
        num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4, topk_group=2, attention_bias=True,
        rope_parameters=dict(**_YARN, mscale=1.0, mscale_all_dim=0.8))),
    ("deepseek_v3", "moonlight"): ("DeepseekV3Config", dict(
        **_MLA, num_hidden_layers=2, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
        topk_group=1, routed_scaling_factor=2.446)),
    ("deepseek_v3", "grouped_yarn"): ("DeepseekV3Config", dict(
        **_MLA, num_hidden_layers=2, q_lora_rank=12, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
        topk_group=2, rope_interleave=False, rope_parameters=dict(**_YARN, mscale=0.9, mscale_all_dim=0.7))),
    ("glm4_moe", "a"): ("Glm4MoeConfig", dict(
        num_hidden_layers=3, head_dim=8, intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, use_qk_norm=True, attention_bias=True,
        n_group=2, topk_group=1, routed_scaling_factor=1.5,
        rope_parameters=dict(**_YARN, partial_rotary_factor=0.5))),
    ("dots1", "a"): ("Dots1Config", dict(
        num_hidden_layers=3, head_dim=8, intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=1.5, attention_bias=True, sliding_window=5,
        max_window_layers=1)),
    ("glm4_moe_lite", "a"): ("Glm4MoeLiteConfig", dict(
        **{k: v for k, v in _MLA.items() if k != "first_k_dense_replace"}, num_hidden_layers=3, q_lora_rank=12,
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=1.8,
        mlp_layer_types=["sparse", "dense", "sparse"], rope_parameters=dict(**_YARN, mscale_all_dim=0.7))),
    ("minimax_m2", "a"): ("MiniMaxM2Config", dict(
        num_hidden_layers=2, head_dim=8, rotary_dim=4, intermediate_size=16, num_local_experts=8,
        num_experts_per_tok=2, bos_token_id=1, eos_token_id=2)),
    ("hunyuan_v1_moe", "a"): ("HunYuanMoEV1Config", dict(
        num_hidden_layers=2, head_dim=8, intermediate_size=16, num_experts=8, moe_topk=2, attention_bias=True,
        rope_parameters=dict(rope_type="dynamic", alpha=10.0, factor=1.0))),
    ("flex_olmo", "a"): ("FlexOlmoConfig", dict(
        num_hidden_layers=2, intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        attention_bias=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    ("ernie4_5_moe", "a"): ("Ernie4_5_MoeConfig", dict(
        num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=16, moe_num_experts=8, moe_k=2,
        moe_num_shared_experts=1, moe_layer_start_index=0, moe_layer_end_index=1, moe_layer_interval=1)),
    ("phimoe", "a"): ("PhimoeConfig", dict(  # longrope switches at 11 tokens: the shared tests' 12 run long
        num_hidden_layers=2, intermediate_size=16, num_local_experts=8, attention_bias=True, lm_head_bias=True,
        router_jitter_noise=0.3, rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=11, short_mscale=1.1,
            long_mscale=1.3, short_factor=[1.0, 1.3, 2.0, 3.5], long_factor=[2.0, 5.0, 9.0, 17.0]))),
    ("gpt_oss", "a"): ("GptOssConfig", dict(
        num_hidden_layers=2, head_dim=8, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=5, swiglu_limit=0.5,
        rope_parameters=dict(**_YARN, truncate=False, beta_fast=16.0, beta_slow=2.0))),
})
_LINEAR = dict(linear_num_key_heads=2, linear_key_head_dim=8, linear_conv_kernel_dim=4, moe_intermediate_size=16,
               shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2, head_dim=16)
CONFIGS.update({  # hybrid Gated DeltaNet / gated-attention layers
    ("qwen3_next", "a"): ("Qwen3NextConfig", dict(
        **_LINEAR, num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_num_value_heads=4, linear_value_head_dim=8, intermediate_size=40, mlp_only_layers=[2],
        norm_topk_prob=False)),
    ("qwen3_5_moe_text", "a"): ("Qwen3_5MoeTextConfig", dict(
        **_LINEAR, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
        linear_value_head_dim=12, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                        partial_rotary_factor=0.5, mrope_section=[2, 1, 1]))),
})
ALL_VARIANTS = list(CONFIGS)
# One variant per family, for the costlier cross-checks (sharding, sequential, prune vs PyTorch, export).
PER_FAMILY = [("olmoe", "a"), ("qwen2_moe", "b"), ("qwen3_moe", "a"), ("mixtral", "b"), ("deepseek_v2", "group_yarn"),
              ("deepseek_v3", "grouped_yarn"), ("glm4_moe", "a"), ("dots1", "a"), ("glm4_moe_lite", "a"),
              ("minimax_m2", "a"), ("hunyuan_v1_moe", "a"), ("flex_olmo", "a"),
              ("ernie4_5_moe", "a"), ("phimoe", "a"), ("gpt_oss", "a"),
              ("qwen3_next", "a"), ("qwen3_5_moe_text", "a")]
# One family per layer structure, for the tests of family-agnostic machinery (sharded calibration, the
# layer-at-a-time driver): plain GQA, a gated shared expert, MLA with a grouped sigmoid router, biases /
# sinks / clamped SwiGLU, a [1, E] score bias beside the router, Gated DeltaNet layers. Weight naming per
# family is covered by every family's load (the full loader and the sequential one share load_layer).
STRUCTURES = [("olmoe", "a"), ("qwen2_moe", "b"), ("deepseek_v3", "grouped_yarn"), ("gpt_oss", "a"),
              ("ernie4_5_moe", "a"), ("qwen3_next", "a")]


# The fast tier's families for the per-family cross-checks: plain GQA, MLA with a grouped sigmoid router, Gated
# DeltaNet layers (every family's logits and statistics run in the fast tier too: tests/test_families.py).
FAST = [("olmoe", "a"), ("deepseek_v3", "grouped_yarn"), ("qwen3_next", "a")]


def tiered(cases, fast=FAST) -> list:
    """A parametrisation of ``cases`` ((family, variant, ...) tuples) in two tiers: cases whose (family, variant) is
    in ``fast`` run in the fast tier (``pytest -m "not slow"``), the others are marked slow; CI runs both."""
    return [c if tuple(c[:2]) in fast else pytest.param(*c, marks=pytest.mark.slow) for c in cases]


def build_hf(family: str, variant: str, seed: int = 0, **overrides):
    """A random transformers model of ``family`` with diverse routing: router weights ~ N(0, 1),
    e_score_correction_bias ~ N(0, 0.5^2), expert biases ~ N(0, 0.1^2), HunYuan q/k norm weights ~ N(1, 0.5^2);
    then (drawn last, so the values above do not move) attention and lm_head biases ~ N(0, 0.1^2) and LayerNorm
    weights ~ N(1, 0.2^2), biases ~ N(0, 0.1^2), which transformers initialises to constants."""
    torch, transformers = pytest.importorskip("torch"), pytest.importorskip("transformers")
    cls_name, kw = CONFIGS[(family, variant)]
    cfg = getattr(transformers, cls_name)(**{**COMMON, **kw, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if re.search(r"(mlp|block_sparse_moe)\.(gate|router)(\.wg)?\.(weight|bias)$", name):
                t.normal_(0.0, 1.0)
            elif re.search(r"(query|key)_layernorm\.weight$", name):  # HunYuan: RoPE and norm do not commute
                t.normal_(1.0, 0.5)
            elif name.endswith("e_score_correction_bias"):
                t.normal_(0.0, 0.5)
            elif re.search(r"experts\.(gate_up|down)_proj_bias$", name):
                t.normal_(0.0, 0.1)
        for name, t in model.named_parameters():
            if re.search(r"(self_attn\.\w+|lm_head)\.bias$", name):
                t.normal_(0.0, 0.1)
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.1)
    return model


def save_hf(model, folder: Path, **kw) -> Path:
    model.save_pretrained(folder, **kw)
    return folder


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """(family, variant) -> (folder, torch model); built lazily, once per session."""
    cache: dict = {}

    def get(family: str, variant: str = "a"):
        key = (family, variant)
        if key not in cache:
            model = build_hf(family, variant)
            folder = save_hf(model, tmp_path_factory.mktemp(f"{family}_{variant}"))
            cache[key] = (folder, model)
        return cache[key]

    return get


def one_device_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess run as a user runs it: one CPU device (XLA_FLAGS without the suite's 8
    devices), the suite's compile flags kept (they change no result this suite checks, only compile time)."""
    return {**os.environ, "XLA_FLAGS": COMPILE_FLAGS, "JAX_PLATFORMS": "cpu", **extra}


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        out = model(torch.as_tensor(ids), attention_mask=None if mask is None else torch.as_tensor(mask))
    return out.logits.float().numpy()


def assert_close_logits(ours: np.ndarray, ref: np.ndarray, atol: float = 1e-4, rtol_norm: float = 1e-5) -> None:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref).max()
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert diff <= atol and rel <= rtol_norm, f"max|diff|={diff:.3g} rel={rel:.3g}"


def rewrite_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))
