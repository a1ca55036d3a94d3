"""Perplexity in JAX vs exp(mean token NLL) from transformers, for original and pruned exports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from checks import hf_perplexity
from conftest import torch

from mone_jax import save_hf
from mone_jax.app.cli import main
from mone_jax.base.errors import UserError
from mone_jax.calib.calibration import calibrate
from mone_jax.convert.formats import torch_model
from mone_jax.convert.load import load_hf
from mone_jax.evaluate.perplexity import perplexity, predicted, unigram_perplexity
from mone_jax.pruning.planning import make_plan
from mone_jax.pruning.transform import prune

RTOL = 1e-4


@pytest.fixture(scope="module")
def data():
    """Token ids [4, 16] of the tiny models' vocabulary; rows 1 and 3 right-padded."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 96, (4, 16)).astype(np.int32)
    mask = np.ones(ids.shape, np.int32)
    mask[1, 11:] = 0
    mask[3, 5:] = 0
    return ids, mask


def test_original_matches_transformers(hf_models, data):
    folder, hf = hf_models("qwen3_moe")
    ids, mask = data
    ours = perplexity(load_hf(folder, progress=False), ids, mask, batch_size=3)
    assert ours["tokens"] == int(predicted(mask).sum())
    assert math.isclose(ours["perplexity"], hf_perplexity(hf, ids, mask), rel_tol=RTOL)
    assert math.isclose(ours["perplexity"], math.exp(ours["nll"]), rel_tol=1e-12)


@pytest.mark.parametrize("fmt", ["substitution", "modepd", "drop"])
def test_pruned_export_matches_transformers(hf_models, data, tmp_path, fmt):
    folder, _ = hf_models("qwen3_moe")
    ids, mask = data
    model = load_hf(folder, progress=False)
    stats = calibrate(model, [ids], progress=False)
    pruned = prune(model, stats, make_plan(stats, ratio=0.5), mode="drop" if fmt == "drop" else "substitute")
    save_hf(pruned, tmp_path / fmt, format=fmt, source=folder)
    hf = torch_model(tmp_path / fmt, dtype=torch.float32).eval()
    ref = hf_perplexity(hf, ids, mask)
    in_memory = perplexity(pruned, ids, mask, batch_size=3)["perplexity"]
    reloaded = perplexity(load_hf(tmp_path / fmt, progress=False), ids, mask, batch_size=3)["perplexity"]
    original = perplexity(model, ids, mask, batch_size=3)["perplexity"]
    assert math.isclose(in_memory, ref, rel_tol=RTOL)
    assert math.isclose(reloaded, ref, rel_tol=RTOL)
    assert not math.isclose(original, ref, rel_tol=1e-3)  # pruning changed the model


def test_unigram_of_uniform_counts_is_vocab_size():
    assert math.isclose(unigram_perplexity(np.arange(50), np.zeros((2, 5), np.int64), 50), 50.0)


def test_bad_input(hf_models):
    model = load_hf(hf_models("qwen3_moe")[0], progress=False)
    with pytest.raises(UserError, match="no predicted tokens"):
        perplexity(model, np.zeros((4, 16), np.int32), np.zeros((4, 16)), batch_size=3)
    with pytest.raises(UserError, match="must lie in"):
        perplexity(model, np.full((1, 4), 96))
    with pytest.raises(UserError, match="T >= 2"):
        perplexity(model, np.zeros((2, 1), np.int32))


def test_cli_eval_json(hf_models, data, tmp_path, capsys):
    folder, _ = hf_models("qwen3_moe")
    ids, _ = data
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "ppl.json"
    rc = main(["eval", str(folder), "--data", str(tmp_path / "ids.npy"), "--num-samples", "3", "--seq-len", "12",
               "--batch-size", "3", "--json", str(out), "--quiet"])
    assert rc == 0
    got = json.loads(out.read_text())
    want = perplexity(load_hf(folder, progress=False), ids[:3, :12], batch_size=3)
    assert got["tokens"] == want["tokens"] == 3 * 11
    assert math.isclose(got["perplexity"], want["perplexity"], rel_tol=1e-6)
    assert "perplexity" in capsys.readouterr().out
    assert main(["eval", str(folder), "--data", "self"]) == 2
