"""The shipped demo model: files, parity with transformers, self-sampling, its training script. (`mone-jax prune`
with no arguments in an empty folder, and its export loading as lm-evaluation-harness loads models: the README
quick start, tests/test_readme.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_close_logits, torch, torch_logits, transformers

from mone_jax.app.data import load_token_blocks
from mone_jax.convert.load import load_hf
from mone_jax.demo import demo_model_dir
from mone_jax.evaluate.perplexity import perplexity
from mone_jax.model.sampling import sampler_for

DEMO = demo_model_dir()
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
TEXT = """The for statement in Python differs a bit from what you may be used to in C or Pascal.

In the beginning, God created the heavens and the earth. The earth was formless and empty."""


@pytest.fixture(scope="module")
def demo():
    return load_hf(DEMO, progress=False)


@pytest.fixture(scope="module")
def hf_demo():
    return transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()


def test_files_size_and_card():
    names = {p.name for p in DEMO.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in DEMO.iterdir()) <= 25 * 10**6
    cfg = json.loads((DEMO / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["num_experts_per_tok"] == 4
    assert 16 <= cfg["num_local_experts"] <= 32
    assert "python scripts/train_demo.py" in (DEMO / "README.md").read_text()


def test_logits_match_transformers(demo, hf_demo):
    tok = transformers.AutoTokenizer.from_pretrained(DEMO)
    ids = tok([TEXT], return_tensors="np")["input_ids"]
    assert_close_logits(np.asarray(demo(ids)), torch_logits(hf_demo, ids), atol=1e-3)


def test_greedy_sampling_matches_transformers_generate(demo, hf_demo):
    ours = sampler_for(demo, temperature=0.0)(2, 16, 0)
    bos = hf_demo.config.bos_token_id
    with torch.no_grad():
        ref = hf_demo.generate(torch.tensor([[bos]]), max_new_tokens=15, min_new_tokens=15, do_sample=False,
                               pad_token_id=bos).numpy()
    np.testing.assert_array_equal(ours, np.repeat(ref, 2, axis=0))


@pytest.mark.slow
def test_sampling_is_seeded(demo):
    sample = sampler_for(demo, temperature=1.0, top_p=0.9)
    a, b, c = sample(3, 16, 1), sample(3, 16, 1), sample(3, 16, 2)
    assert a.shape == (3, 16) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a[0] != a[1]).any()
    assert (a[:, 0] == demo.config.bos_token_id).all()
    assert a.min() >= 0 and a.max() < demo.config.vocab_size


@pytest.mark.skipif(not CORPUS.is_dir(), reason="../shared/corpus is absent (it exists only in the development "
                                                 "checkout); the demo's validation quality is not checked")
def test_beats_unigram_on_validation_text(demo):
    blocks = load_token_blocks(str(CORPUS / "valid.txt"), tokenizer_dir=DEMO, num_samples=4, seq_len=256, seed=0)
    ppl = perplexity(demo, blocks)["perplexity"]
    # the maximum-likelihood unigram of these very tokens: no unigram model does better on them
    _, which, counts = np.unique(blocks[:, 1:], return_inverse=True, return_counts=True)
    best_unigram = math.exp(-np.log(counts[which] / which.size).mean())
    assert ppl < best_unigram / 2


@pytest.mark.slow
def test_training_script_forward_and_export(tmp_path):
    """scripts/train_demo.py: its training forward is the model's, and its folder loads in transformers."""
    import importlib.util

    import jax.numpy as jnp
    from flax import nnx

    from mone_jax.convert.families import parse_config
    from mone_jax.model.causal_lm import MoEForCausalLM

    spec = importlib.util.spec_from_file_location("train_demo", Path(__file__).parents[1] / "scripts" / "train_demo.py")
    td = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(td)
    args = td.parse_args(["--vocab", "64", "--hidden", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
                          "--experts", "8", "--expert-size", "16"])
    config = td.hf_config(args, 0)
    model = td.record_router_logits(nnx.jit(lambda: MoEForCausalLM(parse_config(config), jnp.float32, rngs=nnx.Rngs(1)))())
    ids = np.random.default_rng(0).integers(0, 64, (2, 12)).astype(np.int32)
    logits, balance = nnx.jit(td.forward)(model, jnp.asarray(ids))
    ours = np.asarray(model(ids))
    np.testing.assert_allclose(np.asarray(logits), ours, atol=1e-5)
    assert 0 < float(balance) < args.experts
    td.write_folder(tmp_path, model, 0, config, "card")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert_close_logits(ours, torch_logits(hf, ids))
