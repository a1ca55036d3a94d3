"""Measure, on the demo model, every difference between mone-jax's exact semantics and the MoNE reference
code's (``--semantics reference``): the numbers of README.md "Differences from the reference".

    python scripts/reference_differences.py [--rows 16] [--json out.json]

Calibrates the demo model on the reference's calibration rows (``../shared/reference/mode-pd-demo``, else
the demo model's own samples), batch size 1 (one reference call per row) and 8, and compares.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ml_dtypes
import numpy as np

import mone_jax
from mone_jax.base.errors import UserError
from mone_jax.demo import demo_model_dir
from mone_jax.pruning.planning import make_plan

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "mode-pd-demo"


def _kept(plan) -> dict[int, tuple]:
    return {i: lp.kept for i, lp in plan.layers.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = np.load(REF / "calib_ids_24x512.npy")[:args.rows]
    model = mone_jax.load_hf(demo_model_dir(), progress=False)
    one = mone_jax.calibrate(model, [rows[r:r + 1] for r in range(len(rows))], progress=False, semantics="reference")
    eight = mone_jax.calibrate(model, [rows[r:r + 8] for r in range(0, len(rows), 8)], progress=False,
                               semantics="reference")
    E, out = one.num_experts, {}
    ratios = np.concatenate([s.ref_var.sum(1) / np.maximum(s.var.sum(1), 1e-30) for s in one.layers.values()])
    out["variance_ratio_median"] = float(np.median(ratios))
    out["variance_ratio_range"] = [float(ratios.min()), float(ratios.max())]
    out["single_token_tokens_dropped"] = int(sum((s.count - s.ref_count).sum() for s in one.layers.values()))
    split = [np.max(np.abs(a.ref_var - b.ref_var) / np.maximum(np.abs(b.ref_var), 1e-30))
             for a, b in zip(eight.layers.values(), one.layers.values())]
    out["batch_split_variance_max_rel_change_bs8_vs_bs1"] = float(max(split))
    exact_split = [np.max(np.abs(a.var - b.var) / np.maximum(np.abs(b.var), 1e-30))
                   for a, b in zip(eight.layers.values(), one.layers.values())]
    out["batch_split_exact_variance_max_rel_change"] = float(max(exact_split))
    for scope in ("layer", "model"):
        differ, fewer, pairs, empty = 0, 0, 0, []
        for k in range(1, E):
            ex = make_plan(one, keep=k, scope=scope)
            try:
                rf = make_plan(one, keep=k, scope=scope, semantics="reference")
            except UserError:  # the reference would leave a layer with novices only
                empty.append(k)
                continue
            pairs += len(ex.layers)
            differ += sum(_kept(ex)[i] != _kept(rf)[i] for i in ex.layers)
            fewer += sum(len(lp.kept) < k for lp in rf.layers.values()) if scope == "layer" else \
                int(sum(len(lp.kept) for lp in rf.layers.values()) < k * len(rf.layers))
        out[f"{scope}_scope_kept_sets_differ"] = f"{differ} of {pairs} (layer, K) pairs, K = 1..{E - 1}"
        out[f"{scope}_scope_reference_keeps_fewer_than_N"] = fewer
        out[f"{scope}_scope_K_where_the_reference_empties_a_layer"] = empty
    for k in (12, 8):  # the reference's default run (bfloat16 model) against exact float32 statistics
        theirs = np.load(REF / f"ref_bf16_k{k}.npz")
        ours = make_plan(one, keep=k)
        out[f"bf16_reference_vs_exact_fp32_layers_differing_k{k}"] = sum(
            list(lp.novices) != theirs[f"l{i}.novices"].tolist() for i, lp in ours.layers.items())
    bf16_err = [np.max(np.abs(s.ref_mean.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64) - s.ref_mean)
                       / np.maximum(np.abs(s.ref_mean), 1e-30)) for s in one.layers.values()]
    out["bf16_novice_max_rel_rounding"] = float(max(bf16_err))
    ids = np.load(REF / "eval_ids.npy")[:, :128].astype(np.int32)
    plan_rf = make_plan(one, keep=12, semantics="reference")
    plan_ex = mone_jax.Plan(plan_rf.metric, plan_rf.scope, plan_rf.keep, plan_rf.layers)  # same sets, fp32 novices
    a = np.asarray(mone_jax.prune(model, one, plan_rf)(ids), np.float64)
    b = np.asarray(mone_jax.prune(model, one, plan_ex)(ids), np.float64)
    out["bf16_novices_max_abs_logit_change_k12"] = float(np.max(np.abs(a - b)))
    out["bf16_novices_argmax_agreement_k12"] = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
