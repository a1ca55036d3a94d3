"""A new user's first hour (issue 14): every sample calibrated, parseable and honest output, global options,
clean finished runs, self-describing exports. Runs the real CLI in-process (``mone_jax.cli.main``) on the tiny
checkpoints of conftest.py, against independent references (a float64 NumPy loop, the plan file itself)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from reference import reference_stats
from test_calibration import assert_stats_match

import mone_jax
from mone_jax.cli import main
from mone_jax.stats import Stats


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def ids10(tmp_path) -> Path:
    """10 sequences: with --batch-size 4 the last batch holds 2."""
    path = tmp_path / "ids.npy"
    np.save(path, np.random.default_rng(3).integers(0, 96, (10, 12)).astype(np.int32))
    return path


def test_short_last_batch_is_calibrated_not_dropped(hf_models, ids10, tmp_path, capsys):
    folder, hf = hf_models("olmoe", "a")
    rc, out, _ = cli(capsys, "calibrate", folder, "--calib", ids10, "--batch-size", 4, "--stats-out",
                     tmp_path / "s.safetensors", "--quiet")
    assert rc == 0
    ref, tokens = reference_stats(hf, [(np.load(ids10), None)])  # all 10 samples, float64
    assert_stats_match(Stats.load(tmp_path / "s.safetensors"), ref, tokens)
    assert f"calibrated on {tokens} tokens" in out


def test_prune_stdout_is_json_and_the_ratio_is_stated(hf_models, ids10, tmp_path, capsys):
    folder, _ = hf_models("qwen3_moe", "a")  # 8 experts, 2 MoE layers
    rc, out, err = cli(capsys, "prune", folder, "--calib", ids10, "--ratio", 0.4, "--scope", "model", "--out",
                       tmp_path / "out", "--plan-out", tmp_path / "p.json", "--stats-out", tmp_path / "s.safetensors",
                       "--quiet")
    assert rc == 0
    summary = json.loads(out)  # nothing but JSON on stdout
    plan = json.loads((tmp_path / "p.json").read_text())
    kept = {k: len(v["kept"]) for k, v in plan["layers"].items()}
    assert summary["plan"]["kept_per_layer"] == kept
    achieved = 1 - sum(kept.values()) / (8 * len(kept))
    assert summary["plan"]["pruned_fraction"] == pytest.approx(achieved)
    assert achieved != pytest.approx(0.4)  # 0.4 of 8 experts is not a whole number
    assert f"{achieved:.1%} pruned" in err and "40.0% requested" in err and str(tmp_path / "out") in err
    # `plan --scope model` states the per-layer counts, not one number for all layers
    rc, out, _ = cli(capsys, "plan", tmp_path / "s.safetensors", "--ratio", 0.4, "--scope", "model", "--plan-out",
                     tmp_path / "q.json")
    counts = [len(v["kept"]) for v in json.loads((tmp_path / "q.json").read_text())["layers"].values()]
    assert rc == 0 and "/".join(map(str, counts)) in out and "40.0% requested" in out


def test_version_and_global_options_after_the_command(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mone-jax {mone_jax.__version__}"
    missing = ["plan", tmp_path / "missing.safetensors", "--keep", 1, "--plan-out", tmp_path / "p.json"]
    assert cli(capsys, *missing, "--quiet")[0] == 2
    with pytest.raises(mone_jax.UserError):  # --debug after the command: the traceback, not the one line
        main([str(a) for a in [*missing, "--debug"]])
    with pytest.raises(mone_jax.UserError):
        main(["--debug", *map(str, missing)])


def test_finished_sequential_run_leaves_no_checkpoint_and_equal_bytes(hf_models, ids10, tmp_path, capsys):
    folder, _ = hf_models("olmoe", "a")
    files = []
    for k in range(2):
        files.append(tmp_path / f"s{k}.safetensors")
        rc, _, err = cli(capsys, "calibrate", folder, "--calib", ids10, "--batch-size", 4, "--stats-out", files[-1],
                         "--sequential", "--checkpoint-dir", tmp_path / "ck", "--checkpoint-every", 1, "--quiet")
        assert rc == 0 and "resuming" not in err
        assert not (tmp_path / "ck").exists()
    assert files[0].read_bytes() == files[1].read_bytes()
    stats = Stats.load(files[0])
    for k in range(4):  # safetensors writes metadata in hash order: our files must not
        stats.save(tmp_path / f"again{k}.safetensors")
        assert (tmp_path / f"again{k}.safetensors").read_bytes() == files[0].read_bytes()
