"""The shipped demo model: files, parity with transformers, self-sampling, `mone-jax prune` with no
arguments in an empty folder, and the export loading the way lm-evaluation-harness loads models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_close_logits, torch, torch_logits, transformers

from mone_jax.app.cli import main
from mone_jax.app.data import load_token_blocks
from mone_jax.convert.load import load_hf
from mone_jax.demo import demo_model_dir
from mone_jax.evaluate.perplexity import perplexity, predicted
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


@pytest.fixture(scope="module")
def pruned_demo(tmp_path_factory) -> Path:
    """`mone-jax prune` with no arguments, run in an empty folder as on a fresh install (one CPU device,
    not the 8 the test session simulates)."""
    cwd = tmp_path_factory.mktemp("empty")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run([sys.executable, "-m", "mone_jax.app.cli", "prune", "--quiet"], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return cwd / "mone-demo-out"


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
def test_prune_without_arguments_then_verify(pruned_demo):
    run = subprocess.run([sys.executable, "-m", "mone_jax.app.cli", "verify", str(pruned_demo)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    cfg = json.loads((pruned_demo / "config.json").read_text())
    targets = cfg["compression_config"]["transform_config"]["expert_substitution"]["targets"]
    assert len(targets) == cfg["num_hidden_layers"]
    assert all(len(t["replacements"]) == 4 for t in targets.values())  # 25% of 16 experts


@pytest.mark.slow
def test_pruned_export_for_lm_eval_and_cli_eval(pruned_demo, tmp_path):
    """Load as lm-evaluation-harness's `hf` model does; our `eval` equals transformers' perplexity."""
    config = transformers.AutoConfig.from_pretrained(pruned_demo, trust_remote_code=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(pruned_demo, trust_remote_code=True, dtype="auto").eval()
    tok = transformers.AutoTokenizer.from_pretrained(pruned_demo, trust_remote_code=True)
    assert tok.eos_token_id == config.eos_token_id and tok.pad_token_id is not None
    enc = tok(["In the beginning"], return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, enc["input_ids"].shape[1] + 6)
    assert isinstance(tok.decode(out[0]), str)

    text = tmp_path / "doc.txt"
    text.write_text(TEXT)
    result = tmp_path / "ppl.json"
    assert main(["eval", str(pruned_demo), "--data", str(text), "--num-samples", "2", "--seq-len", "16",
                 "--json", str(result), "--quiet"]) == 0
    ours = json.loads(result.read_text())
    ids = load_token_blocks(str(text), tokenizer_dir=pruned_demo, num_samples=2, seq_len=16, contiguous=True)
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.as_tensor(ids)).logits.double()[:, :-1], -1)
    nll = -logp.gather(-1, torch.as_tensor(ids[:, 1:, None], dtype=torch.long))[..., 0].numpy()
    assert ours["tokens"] == int(predicted(np.ones(ids.shape)).sum())
    assert math.isclose(ours["perplexity"], math.exp(nll.mean()), rel_tol=1e-4)


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
