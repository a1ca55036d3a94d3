"""The calibration benchmark runs end to end on a tiny model and writes well-formed JSON (no timing checks)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "64", "--head-dim", "16", "--experts", "8", "--top-k", "2", "--moe-inter", "32", "--layers", "2",
        "--vocab", "256", "--seq-len", "32", "--batch", "2", "--tokens", "128", "--reps", "1", "--warmup", "1",
        "--matmul-n", "64", "--prune-ratios", "0.25,0.5"]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("family", ["qwen3_moe"])  # one family: the bench code is family-agnostic
def test_bench_tiny_writes_json(tmp_path, family):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "calib_bench.py"), *TINY, "--family", family,
         "--impls", "scan,dense", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "calibration pass" in proc.stdout and "ours / PyTorch" in proc.stdout
    res = json.loads(out.read_text())
    assert res["platform"]["backend"] == "cpu" and res["platform"]["cpu_cores"] >= 1
    assert set(res["matmul_gflops"]) == {"matmul jax float32", "matmul jax bfloat16", "matmul torch float32"}
    assert all(_positive(v) for v in res["matmul_gflops"].values())
    rows = {r["name"]: r for r in res["calibration"]}
    want = {f"jax {i} {d}" for i in ("scan", "dense") for d in ("float32", "bfloat16")}
    want |= {"torch base+stats float32", "torch base+stats bfloat16", "torch forward+stats float32"}
    assert set(rows) == want
    for r in rows.values():
        assert r["tokens"] > 0 and len(r["times_s"]) == 1
        assert r["compiles_in_timed_reps"] == 0, r["name"]  # equal batch shapes: compiled once, in warm-up
        for key in ("median_s", "best_s", "tokens_per_s", "gflops", "frac_of_f32_matmul", "rss_peak_gb"):
            assert _positive(r[key]), (r["name"], key)
    assert rows["jax dense float32"]["tokens"] == 128  # all tokens fit in --slow-tokens
    assert len(res["ratios"]) == 6 and all(_positive(v[k]) for v in res["ratios"].values() for k in ("median", "best"))
    parity = res["parity_vs_torch_float32"]
    assert parity["max_rel_mean_diff"] < 1e-3 and parity["max_rel_var_diff"] < 1e-3
    pruned = {r["model"]: r for r in res["pruned"]}
    assert set(pruned) == {"original", "pruned 25%", "pruned 50%"}
    assert pruned["original"]["moe_vs_original"] == 1.0 and pruned["original"]["kept_pair_share"] == 1.0
    assert 0 < pruned["pruned 50%"]["kept_pair_share"] < pruned["pruned 25%"]["kept_pair_share"] < 1
    assert all(_positive(r[k]) for r in pruned.values() for k in ("moe_s", "forward_s", "forward_vs_original"))
    assert _positive(res["rss_max_gb"])
    f = res["flops_per_pass"]
    assert f["experts"] == 128 * 2 * 2 * 6 * 64 * 32  # tokens * layers * top-k * 6 d f


def test_whole_process_mode(tmp_path):
    """`--whole-process` runs both tools as processes, reports the token count and the matmul ceilings, and the
    two processes' statistics agree (one token count: each costs three processes)."""
    out = tmp_path / "whole.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = [a for a in TINY if a not in ("--prune-ratios", "0.25,0.5")]
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "calib_bench.py"), *args, "--whole-process", "--token-counts", "128",
         "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["median"]) == {"128"}
    for m in res["median"].values():
        assert all(_positive(m[k]) for k in ("mone-jax first", "mone-jax rerun", "pytorch", "compile first"))
    assert set(res["matmul_gflops"]) == {"matmul jax float32", "matmul torch float32"}
    assert all(_positive(v) for v in res["matmul_gflops"].values())
    parity = res["parity_vs_torch_float32"]
    assert parity["max_rel_mean_diff"] < 1e-4 and parity["max_rel_var_diff"] < 1e-4, parity
    assert "| 128 |" in proc.stdout and "jax / torch" in proc.stdout
