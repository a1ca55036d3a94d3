"""The PyTorch way of calibrating, as a whole process: the counterpart of `mone-jax calibrate` in benchmarks.

    python bench/torch_calibrate.py MODEL_DIR --calib ids.npy --num-samples 128 --seq-len 512 --stats-out s.npz

transformers loads the checkpoint; each experts module's forward is replaced by transformers' sorted
grouped product that also reduces the raw per-expert outputs into the statistics mone-jax collects
(count, routing-weight sum, two-pass mean / M2 merged in float64, REAP sum; see ``TorchStats`` in
calib_bench.py); the LM head is skipped as in mone-jax. The statistics are written with NumPy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--calib", required=True, help=".npy of token ids [N, T]")
    ap.add_argument("--num-samples", type=int, required=True)
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPU cores)")
    ap.add_argument("--stats-out", required=True)
    args = ap.parse_args()

    import numpy as np
    import torch
    import transformers
    from calib_bench import TorchStats, torch_pass

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    ids = np.load(args.calib, allow_pickle=False)[:args.num_samples, :args.seq_len].astype(np.int64)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    stats = TorchStats(model)
    loaded = time.perf_counter()
    torch_pass(model, [ids[i:i + args.batch_size] for i in range(0, len(ids), args.batch_size)], stats, logits=False)
    done = time.perf_counter()
    np.savez(args.stats_out, **{f"layers.{i}.{k}": v.numpy() for i, acc in stats.acc.items() for k, v in acc.items()})
    print(f"start+load {loaded - start:.1f} s, calibrate {done - loaded:.1f} s, {len(ids) * ids.shape[1]} tokens",
          file=sys.stderr)


if __name__ == "__main__":
    main()
