"""--sequential (one decoder layer resident at a time) equals the full model, statistics and export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from checks import assert_identical, assert_stats_equal
from checks import mesh_batches as batches
from conftest import STRUCTURES, tiered

import mone_jax
import mone_jax.app.sequential as seq
from mone_jax.app.cli import main
from mone_jax.base.stats import Stats
from mone_jax.calib.calibration import calibrate
from mone_jax.model.sharding import make_mesh


@pytest.mark.parametrize("family,variant", tiered(STRUCTURES))
def test_sequential_equals_full_model(hf_models, family, variant):
    """Bit-identical statistics for one family per layer structure."""
    folder, _ = hf_models(family, variant)
    model = mone_jax.load_hf(folder, progress=False)
    data = batches(model.config.vocab_size)
    assert_identical(seq.calibrate_sequential(folder, data, progress=False), calibrate(model, data, progress=False))


def test_sequential_streams_layers(hf_models, tmp_path, monkeypatch):
    """One layer read at a time; memory-mapped hidden states give the same statistics, then vanish."""
    folder, _ = hf_models("qwen2_moe", "b")
    model = mone_jax.load_hf(folder, progress=False)
    data = batches(model.config.vocab_size)
    loaded = []
    load_layer = seq.load_layer
    monkeypatch.setattr(seq, "load_layer", lambda r, cfg, i, dt, **kw: loaded.append(i) or load_layer(r, cfg, i, dt, **kw))
    got = seq.calibrate_sequential(folder, data, progress=False, offload_dir=tmp_path)
    assert loaded == list(range(model.config.num_layers))
    assert_identical(got, calibrate(model, data, progress=False))
    assert not list(tmp_path.iterdir())  # the offload file is gone once the run ends


@pytest.mark.parametrize("family,variant", [("olmoe", "a"), pytest.param("qwen2_moe", "a", marks=pytest.mark.slow)])  # 8, 6 (padded) experts
def test_sequential_on_a_mesh(hf_models, family, variant):
    """Within float32 rounding: expert outputs summed across shards round differently, and layer l's
    hidden states carry that into layer l + 1's statistics."""
    folder, _ = hf_models(family, variant)
    model = mone_jax.load_hf(folder, progress=False)
    data = batches(model.config.vocab_size)
    got = seq.calibrate_sequential(folder, data, mesh=make_mesh((2, 4)), progress=False)
    assert_stats_equal(got, calibrate(model, data, progress=False))


@pytest.mark.parametrize("fmt", ["substitution", "drop"])
def test_sequential_prune_writes_the_same_checkpoint(hf_models, tmp_path, fmt):
    folder, _ = hf_models("qwen2_moe", "b")
    np.save(tmp_path / "ids.npy", np.random.default_rng(2).integers(0, 96, (8, 12)).astype(np.int32))
    outs = {}
    for mode in ("full", "sequential"):
        out = tmp_path / mode / "pruned"  # the model card names the folder: the same name in both runs
        argv = ["prune", str(folder), "--calib", str(tmp_path / "ids.npy"), "--batch-size", "4", "--keep", "4",
                "--format", fmt, "--out", str(out), "--stats-out", str(tmp_path / f"{mode}.safetensors"), "--quiet"]
        assert main(argv + (["--sequential"] if mode == "sequential" else [])) == 0
        outs[mode] = json.loads((out / "mone_manifest.json").read_text())
    assert outs["full"] == outs["sequential"]
    assert_identical(Stats.load(tmp_path / "full.safetensors"), Stats.load(tmp_path / "sequential.safetensors"))


def test_sequential_refusals(hf_models, tmp_path, capsys):
    folder, _ = hf_models("olmoe", "a")
    np.save(tmp_path / "ids.npy", np.zeros((2, 8), np.int32))
    base = ["calibrate", str(folder), "--stats-out", str(tmp_path / "s.safetensors"), "--quiet"]
    assert main(base + ["--calib", "self", "--sequential"]) == 2
    assert "--sequential" in capsys.readouterr().err
    assert main(base + ["--calib", str(tmp_path / "ids.npy"), "--offload-dir", str(tmp_path)]) == 2
    assert "--offload-dir" in capsys.readouterr().err
