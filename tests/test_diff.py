"""`mone-jax diff` through the CLI: an export in two formats agrees with itself, a single perturbed novice
is caught (exit code 1) in the layer where it sits, and JAX agrees with transformers on a tiny model."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import torch_logits
from safetensors.numpy import load_file, save_file

import mone_jax
from mone_jax.app.cli import main
from mone_jax.demo import demo_model_dir

DEMO = demo_model_dir()
PERTURBED_LAYER = 2


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """The demo model 25% pruned, written as ``substitution`` and as ``modepd``, and a copy of the
    substitution export with one novice of layer PERTURBED_LAYER changed by 1e-2 in one coordinate."""
    out = tmp_path_factory.mktemp("diff")
    model = mone_jax.load_hf(DEMO, progress=False)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 32))
    stats = mone_jax.calibrate(model, [ids], progress=False)
    pruned = mone_jax.prune(model, stats, mone_jax.plan(stats, ratio=0.25))
    folders = {fmt: out / fmt for fmt in ("substitution", "modepd")}
    for fmt, folder in folders.items():
        mone_jax.save_hf(pruned, folder, format=fmt, source=DEMO)
    folders["perturbed"] = out / "perturbed"
    shutil.copytree(folders["substitution"], folders["perturbed"])
    (path,) = folders["perturbed"].glob("*.safetensors")
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if f"layers.{PERTURBED_LAYER}." in k and "expert_replacements" in k)
    tensors[key] = tensors[key].copy()
    tensors[key][0] += 1e-2
    save_file(tensors, path, metadata={"format": "pt"})
    return folders


def _diff(*args: str) -> tuple[int, dict]:
    """Exit code and JSON report of `mone-jax diff ARGS --json`."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["diff", *args, "--json", "--quiet"])
    return code, json.loads(buf.getvalue())


def test_same_model_in_two_formats_passes(exports):
    code, rep = _diff(str(exports["substitution"]), str(exports["modepd"]), "--tol", "1e-5")
    assert code == 0 and rep["passed"]
    assert rep["logits"]["max_abs"] <= 1e-5 and rep["logits"]["top1_agreement"] == 1.0
    assert rep["logits"]["mean_kl"] < 1e-9
    assert len(rep["layers"]) == 4 and all("moe" in row for row in rep["layers"].values())


def test_a_perturbed_novice_fails_from_its_layer_on(exports):
    code, rep = _diff(str(exports["substitution"]), str(exports["perturbed"]), "--tol", "1e-5",
                      "--text", "In the beginning, God created the heavens and the earth. for x in range(10):")
    assert code == 1 and not rep["passed"]
    assert rep["logits"]["max_abs"] > 1e-5
    moe = {int(i): row["moe"]["max_abs"] for i, row in rep["layers"].items()}
    assert all(moe[i] == 0.0 for i in moe if i < PERTURBED_LAYER)  # identical before the perturbed layer
    assert moe[PERTURBED_LAYER] > 0.0


def test_vs_torch_on_a_tiny_model(hf_models, tmp_path):
    """--vs-torch agrees within 1e-4, and its max|diff| is the one computed here from transformers' logits
    and the JAX forward."""
    folder, torch_model = hf_models("qwen2_moe", "a")
    ids = np.random.default_rng(1).integers(0, 96, (2, 12))
    np.save(tmp_path / "ids.npy", ids)
    code, rep = _diff(str(folder), "--vs-torch", "--tokens", str(tmp_path / "ids.npy"), "--tol", "1e-4")
    assert code == 0 and rep["b"] == "transformers"
    ref = torch_logits(torch_model, ids).astype(np.float64)
    ours = np.asarray(mone_jax.load_hf(folder, progress=False)(ids), np.float64)
    assert abs(rep["logits"]["max_abs"] - np.abs(ours - ref).max()) <= 1e-5  # float32 rounding apart
    assert rep["logits"]["top1_agreement"] == np.mean(ours.argmax(-1) == ref.argmax(-1))
    moe_layers = [i for i, layer in enumerate(torch_model.model.layers) if hasattr(layer.mlp, "experts")]
    assert sorted(int(i) for i, row in rep["layers"].items() if "moe" in row) == moe_layers
    assert main(["diff", str(folder), str(folder), "--vs-torch", "--quiet"]) == 2  # B and --vs-torch
