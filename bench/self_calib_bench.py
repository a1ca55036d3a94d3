"""`--calib self` on the demo model: this tree against another git revision, side by side.

    python bench/self_calib_bench.py --baseline 0c2fbd4    # 16 x 256 against the model without a KV cache
    python bench/self_calib_bench.py --baseline 0c2fbd4 --reps 3 --num-samples 16 --seq-len 256

The baseline revision is exported with ``git archive`` to a temporary folder. Each run is a fresh
``mone-jax calibrate MODEL --calib self`` process (start-up, loading, sampling, calibration), timed
wall-clock; runs alternate (baseline, this tree, baseline, ...) so that machine load hits both alike. Every
run starts with an empty compilation cache (a user's first run; a rerun would load its programs).
The load average is printed before every run.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

from child_env import child_env

REPO = Path(__file__).resolve().parents[1]


def export_revision(rev: str, dest: Path) -> Path:
    """The tree of ``rev`` in ``dest``, with ``convert/`` importable as ``mone_jax.convert``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    link = dest / "mone_jax" / "convert"
    if not link.exists():
        link.symlink_to("../convert")
    return dest


def run_once(tree: Path, args, out: Path) -> tuple[float, float]:
    """Wall-clock and CPU (user + system) seconds of one calibrate process."""
    env = child_env(PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]),
                    MONE_JAX_COMPILE_CACHE=str(out.with_suffix(".xla")))  # a fresh, empty compilation cache: a first run
    entry = "mone_jax.app.cli" if (tree / "mone_jax" / "app" / "cli.py").is_file() else "mone_jax.cli"  # older trees
    cmd = [sys.executable, "-m", entry, "calibrate", str(args.model), "--calib", "self", "--num-samples",
           str(args.num_samples), "--seq-len", str(args.seq_len), "--stats-out", str(out), "--quiet"]
    before, start = _child_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    took, cpu = time.perf_counter() - start, _child_cpu() - before
    if proc.returncode:
        sys.exit(f"{tree}: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return took, cpu


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True,
                    help="git revision to compare against (0c2fbd4: the last main commit without a KV cache)")
    ap.add_argument("--model", default=REPO / "mone_jax" / "demo" / "model")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {args.baseline: export_revision(args.baseline, tmp / "baseline"), "this tree": REPO}
        times: dict[str, list[float]] = {name: [] for name in trees}
        cpus: dict[str, list[float]] = {name: [] for name in trees}
        for rep in range(args.reps):
            for name, tree in trees.items():
                load = os.getloadavg()[0]
                took, cpu = run_once(tree, args, tmp / f"{name}-{rep}.safetensors".replace(" ", "_"))
                times[name].append(took)
                cpus[name].append(cpu)
                print(f"rep {rep + 1} {name:>12}: {took:7.1f} s wall, {cpu:7.1f} s CPU  (load average before: "
                      f"{load:.1f})", flush=True)
        same = _same_counts(*(tmp / f"{name}-0.safetensors".replace(" ", "_") for name in trees))
    base, this = (statistics.median(t) for t in times.values())
    base_cpu, this_cpu = (statistics.median(t) for t in cpus.values())
    print(f"--calib self {args.num_samples} x {args.seq_len}: {args.baseline} {base:.1f} s, this tree {this:.1f} s "
          f"(medians of {args.reps}), {base / this:.1f}x faster ({base_cpu / this_cpu:.1f}x in CPU time); "
          f"load average now {os.getloadavg()[0]:.1f}; "
          f"same per-expert token counts (so same sampled tokens, to rounding): {same}")


def _same_counts(a: Path, b: Path) -> bool:
    from safetensors.numpy import load_file

    x, y = load_file(str(a)), load_file(str(b))
    keys = [k for k in x if x[k].dtype.kind == "i"]
    return keys == [k for k in y if y[k].dtype.kind == "i"] and all((x[k] == y[k]).all() for k in keys)


if __name__ == "__main__":
    main()
