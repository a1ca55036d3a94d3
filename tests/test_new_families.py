"""Options of the 2025-26 families that the shared table's one variant each does not reach: MiniMax-M2's
legacy ``rotary_dim`` (its released configs), Phi-MoE's short-sequence RoPE, and the config values each family
refuses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import COMMON, CONFIGS, assert_close_logits, rewrite_config, torch_logits, transformers

import mone_jax
from mone_jax.base.errors import UserError
from mone_jax.convert.families import parse_config


def _config(family: str, **changes) -> dict:
    """The config.json dict of the family's tiny test config, with ``changes``."""
    cls_name, kw = CONFIGS[(family, "a")]
    return {**getattr(transformers, cls_name)(**{**COMMON, **kw}).to_dict(), **changes}


def test_minimax_m2_partial_rope_from_rotary_dim_alone(hf_models, tmp_path):
    """Released MiniMax-M2 configs give partial RoPE only as ``rotary_dim``: transformers derives the factor."""
    folder, _ = hf_models("minimax_m2", "a")
    shutil.copytree(folder, tmp_path / "m")
    rope = json.loads((folder / "config.json").read_text())["rope_parameters"]
    rewrite_config(tmp_path / "m", rope_parameters={k: v for k, v in rope.items() if k != "partial_rotary_factor"})
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert theirs.config.rope_parameters["partial_rotary_factor"] == 0.5  # rotary_dim 4 of head_dim 8
    ids = np.random.default_rng(2).integers(0, theirs.config.vocab_size, (2, 12)).astype(np.int32)
    assert_close_logits(mone_jax.load_hf(tmp_path / "m", progress=False)(ids), torch_logits(theirs, ids))


def test_phimoe_short_sequences_match_transformers(hf_models):
    """The shared tests run Phi-MoE past its original length (12 > 11 tokens: long_mscale); this runs it within
    (short_mscale), so both sides of the length switch are compared."""
    folder, hf = hf_models("phimoe", "a")
    ids = np.random.default_rng(4).integers(0, hf.config.vocab_size, (2, 11)).astype(np.int32)
    assert_close_logits(mone_jax.load_hf(folder, progress=False)(ids), torch_logits(hf, ids))


@pytest.mark.parametrize("family,changes,match", [
    ("hunyuan_v1_moe", dict(use_cla=True), "cross-layer attention"),
    ("hunyuan_v1_moe", dict(moe_topk=[2, 3]), r"per-layer moe_topk \[2, 3\]"),
    ("ernie4_5_moe", dict(use_bias=True), "use_bias = true"),
    ("glm4_moe_lite", dict(mlp_layer_types=["dense", "sparse"]), "mlp_layer_types must list"),
    ("phimoe", dict(num_experts_per_tok=3), "exactly 2 experts"),
    ("phimoe", dict(rope_parameters={**CONFIGS[("phimoe", "a")][1]["rope_parameters"], "long_mscale": None}),
     "needs short_mscale and long_mscale"),
])
def test_unsupported_options_are_refused(family, changes, match):
    with pytest.raises(UserError, match=match):
        parse_config(_config(family, **changes))


def test_hunyuan_per_layer_lists_of_one_value_are_read():
    """Released HunYuan configs repeat top-k per layer (``moe_topk: [8, 8, ...]``)."""
    cfg = parse_config(_config("hunyuan_v1_moe", moe_topk=[2, 2], num_experts_per_tok=None))
    assert cfg.top_k == 2 and cfg.num_experts == 8


@pytest.mark.parametrize("family", ["glm4_moe_lite", "minimax_m2", "ernie4_5_moe", "hunyuan_v1_moe", "flex_olmo",
                                    "phimoe"])
def test_inspect_counts_match_transformers(hf_models, family):
    """``inspect`` on each new family: MoE layers and parameter counts as the transformers model holds them."""
    from mone_jax.app.describe import summarize

    folder, hf = hf_models(family, "a")
    s = summarize(folder)
    assert s["moe_layers"] == [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    assert s["params_routed_experts"] == sum(p.numel() for n, p in hf.named_parameters() if ".experts." in n)
    assert s["params_total"] == sum(t.numel() for t in hf.state_dict().values())
