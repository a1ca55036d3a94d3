"""Every benchmark's command line runs on a toy size and writes what it promises (the measurements themselves
are taken by hand: bench/README.md; no timing is checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import one_device_env

pytest.importorskip("torch")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"  # the demo's text (absent from an end user's checkout)
TINY = ["--hidden", "64", "--head-dim", "16", "--experts", "8", "--top-k", "2", "--moe-inter", "32", "--layers", "2",
        "--vocab", "256", "--seq-len", "32", "--batch", "2", "--tokens", "128", "--reps", "1", "--warmup", "1",
        "--matmul-n", "64"]
BENCHES = {  # name -> (script, arguments, what stdout must say)
    "calibration": ("calib_bench.py", [*TINY, "--family", "qwen3_moe", "--impls", "scan", "--dtypes", "float32",
                                       "--prune-ratios", "0.5", "--json", "out.json"], "ours / PyTorch"),
    "memory at scale": ("scale_bench.py", ["--shape", "custom", "--dir", "scale", "--layers", "2", "--hidden", "64",
                                           "--experts", "4", "--top-k", "2", "--expert-ffn", "32", "--vocab", "256",
                                           "--tokens", "128", "--seq-len", "32", "--modes", "bf16,seq"], "| seq | "),
    "self-calibration": ("self_calib_bench.py", ["--baseline", "HEAD", "--num-samples", "2", "--seq-len", "16",
                                                 "--reps", "1"], "same per-expert token counts"),
    "bfloat16 vs float32": ("precision_bench.py", [*([] if (CORPUS / "train.txt").is_file() else ["--no-demo"]),
                                                   "--calib-samples", "4", "--seq-len", "32", "--valid-samples", "2",
                                                   "--families", "olmoe:a", "--family-samples", "4",
                                                   "--family-seq-len", "16", "--seeds", "0", "--dtypes", "bfloat16",
                                                   "--ratios", "0.5",
                                                   "--md", "out.md", "--json", "out.json"], "same kept experts as float32"),
    "distillation memory": ("fit_memory.py", ["--variants", "base", "--batch", "2", "--seq-len", "16", "--json",
                                              "out.json"], "| base | kd-down |"),
}


@pytest.mark.parametrize("bench", BENCHES)
def test_bench_runs_on_a_toy_size(tmp_path, bench):
    script, args, says = BENCHES[bench]
    env = one_device_env()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert says in proc.stdout, proc.stdout[-3000:]
    if "--json" in args:
        assert json.loads((tmp_path / "out.json").read_text())
