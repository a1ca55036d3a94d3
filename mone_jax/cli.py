"""The ``mone-jax`` command line."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import warnings
from typing import NoReturn

import numpy as np

from mone_jax.errors import UserError
from mone_jax.io import atomic_write, atomic_write_text, token_ids


def _load(args):
    from mone_jax.convert.load import load_hf

    return load_hf(args.model, dtype=args.dtype, progress=not args.quiet)


def cmd_inspect(args) -> None:
    from mone_jax.inspect import describe

    print(describe(args.model, as_json=args.json))


def cmd_forward(args) -> None:
    model = _load(args)
    try:
        ids = np.load(args.tokens, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read token ids from '{args.tokens}' ({e}): give a .npy of int token ids") from None
    ids = token_ids(ids, model.config.vocab_size, f"'{args.tokens}'")
    logits = np.asarray(model(ids), np.float32)
    atomic_write(args.out, lambda tmp: tmp.write_bytes(_npy_bytes(logits)))
    print(f"wrote logits {list(logits.shape)} to {args.out}")


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def cmd_calibrate(args) -> None:
    from mone_jax.jobs import calibrate_job
    from mone_jax.scale import init_distributed, is_writer, run_calibration

    job = calibrate_job(args)
    init_distributed(job.scale)
    stats = run_calibration(job)
    if is_writer():
        stats.save(args.stats_out)
    print(f"calibrated on {stats.tokens} tokens; statistics of {len(stats.layers)} MoE layers -> {args.stats_out}")


def cmd_plan(args) -> None:
    from pathlib import Path

    from mone_jax.convert.criteria import plan_for
    from mone_jax.scoring import metric
    from mone_jax.stats import Stats

    opts = dict(keep=args.keep, ratio=args.ratio, scope=args.scope, seed=args.seed)
    if args.metric == "auto":  # every candidate's pruned model judged on validation data
        from mone_jax.compare_job import select_for_plan

        plan = select_for_plan(args, Stats.load(args.stats))
    elif metric(args.metric).needs_weights:  # weights only: the positional argument is the model folder
        if not Path(args.stats).is_dir():
            raise UserError(f"metric '{args.metric}' scores the weights, not statistics: give the model folder "
                            f"instead of '{args.stats}'")
        plan = plan_for(args.metric, model=args.stats, **opts)
    else:
        if Path(args.stats).is_dir():
            raise UserError(f"'{args.stats}' is a folder: metric '{args.metric}' needs a statistics file from "
                            "`mone-jax calibrate`")
        plan = plan_for(args.metric, stats=Stats.load(args.stats), **opts)
    plan.save(args.plan_out)
    lp = next(iter(plan.layers.values()))
    print(f"plan: keep {plan.keep} of {len(lp.kept) + len(lp.novices)} experts per layer ({plan.metric}, "
          f"{args.scope}) -> {args.plan_out}")


def cmd_prune(args) -> None:
    from mone_jax.convert.criteria import plan_for
    from mone_jax.jobs import prune_job
    from mone_jax.scale import init_distributed, is_writer, run_calibration
    from mone_jax.sequential import export_from_stats

    job = prune_job(args)
    if job.calib is not None:
        init_distributed(job.calib.scale)
    n_group = job.config.n_group if job.format.mode == "drop" else 1  # drop: the same number in every group
    if job.metric == "auto" and job.plan is None:  # calibrates on what the validation split leaves
        from mone_jax.compare_job import select_for_prune

        stats, plan = select_for_prune(job, args.valid, args.valid_fraction, args.valid_samples, args.batch_size)
    else:
        stats = job.stats if job.calib is None else run_calibration(job.calib)
        plan = job.plan or plan_for(job.metric, stats=stats, model=job.model, keep=job.keep, scope=job.scope,
                                    seed=job.seed, n_group=n_group)
    if not is_writer():
        return
    if job.stats_out:  # before the export: a failed export does not lose the calibration
        stats.save(job.stats_out)
    if job.plan_out:
        plan.save(job.plan_out)
    # streamed from the source checkpoint shard by shard: the pruned model is never assembled in memory
    record = {"mone_plan.json": plan.to_dict()} if plan.selection else None  # the auto choice's evidence
    summary = export_from_stats(job.model, job.out, stats, plan, fmt=job.format.name, dtype=job.dtype,
                                out_dtype=job.out_dtype, overwrite=job.overwrite, extra_json=record)
    print(json.dumps(summary, indent=1))
    print(f"pruned checkpoint written to {job.out}")


def cmd_compare(args) -> None:
    from mone_jax.compare_job import run_compare

    res = run_compare(args)
    t = res["timing"]
    print(f"{len(res['plans'])} plans judged on {', '.join(res['sources'])} in {t['total']:.1f} s (calibration "
          f"{t['calibration']:.1f} s, compilation {t['compile']:.1f} s, {t['forward_per_plan']:.2f} s per plan); "
          f"wrote {', '.join(res['written'].values())}")


def cmd_eval(args) -> None:
    from mone_jax.data import load_token_blocks
    from mone_jax.evaluate import perplexity

    if args.data == "self":
        raise UserError("evaluate on held-out data (a file, folder, .npy or hf:NAME), not on the model's own samples")
    model = _load(args)
    cfg = model.config
    if args.seq_len > cfg.max_position_embeddings:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                        f"{cfg.max_position_embeddings}: lower --seq-len")
    ids = load_token_blocks(args.data, tokenizer_dir=args.model, num_samples=args.num_samples, seq_len=args.seq_len,
                            text_field=args.text_field, vocab_size=cfg.vocab_size, contiguous=True)
    result = perplexity(model, ids, batch_size=args.batch_size, progress=not args.quiet)
    result.update(model=args.model, data=args.data, num_samples=int(ids.shape[0]), seq_len=int(ids.shape[1]))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    print(f"perplexity {result['perplexity']:.4f} (mean NLL {result['nll']:.5f}) over {result['tokens']} tokens")


def cmd_verify(args) -> None:
    from mone_jax.convert.export import verify_export

    problems = verify_export(args.folder)
    if problems:
        raise UserError(f"'{args.folder}' failed verification: {problems[0]}"
                        + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    print(f"{args.folder}: all files match the manifest")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"mone-jax: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="mone-jax", description="MoNE expert pruning for MoE language models (JAX).")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def model_arg(p, optional=False):
        if optional:
            p.add_argument("model", nargs="?", default=None, help="Hugging Face model folder (default: the demo model)")
        else:
            p.add_argument("model", help="Hugging Face model folder (safetensors)")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    def calib_args(p):
        p.add_argument("--calib", default=None, help="token ids .npy, text file/folder (.txt/.jsonl/.parquet), "
                                                     "hf:NAME[:CONFIG][:SPLIT], or 'self'")
        p.add_argument("--num-samples", type=int, default=None, help="calibration sequences (default 128)")
        p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512)")
        p.add_argument("--text-field", default="text")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--seed", type=int, default=0)
        from mone_jax.scale import add_args

        add_args(p)

    def plan_args(p, required=True):
        g = p.add_mutually_exclusive_group(required=required)
        g.add_argument("--keep", type=int, help="experts kept per MoE layer")
        g.add_argument("--ratio", type=float, help="fraction of experts pruned, in [0, 1)")
        p.add_argument("--metric", default="mone", help="scoring criterion, or 'auto': the lowest validation loss")
        p.add_argument("--scope", default="layer")

    def auto_args(p):
        p.add_argument("--valid", default=None, help="--metric auto: validation data disjoint from the calibration "
                                                     "(a file, folder, .npy, hf:NAME, or NAME=SPEC,NAME=SPEC)")
        p.add_argument("--valid-fraction", type=float, default=0.1,
                       help="--metric auto without --valid: share of the calibration blocks held out (default 0.1)")
        p.add_argument("--valid-samples", type=int, default=64, help="validation blocks per source (default 64)")

    p = sub.add_parser("inspect", help="family, layers, experts and parameter counts of a checkpoint")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("forward", help="logits for given token ids (cross-framework check)")
    model_arg(p)
    p.add_argument("--tokens", required=True, help=".npy of int token ids [B, T]")
    p.add_argument("--out", required=True, help="output .npy of float32 logits")
    p.set_defaults(fn=cmd_forward)

    p = sub.add_parser("calibrate", help="per-expert statistics over calibration data")
    model_arg(p)
    calib_args(p)
    p.add_argument("--stats-out", required=True)
    p.set_defaults(fn=cmd_calibrate)

    p = sub.add_parser("plan", help="score experts and choose kept / novices")
    p.add_argument("stats", help="statistics file from `mone-jax calibrate`, or the model folder for a weights-only "
                                 "metric (aimer)")
    plan_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan-out", required=True)
    auto_args(p)
    p.add_argument("--model", default=None, help="--metric auto: the model folder the statistics belong to")
    p.add_argument("--format", default="substitution", help="--metric auto: the export format candidates are "
                                                            "judged in (its prune mode)")
    p.add_argument("--seq-len", type=int, default=512, help="--metric auto: tokens per validation block")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("prune", help="calibrate, plan, prune and export in one go")
    model_arg(p, optional=True)
    calib_args(p)
    plan_args(p, required=False)
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--format", default="substitution")
    p.add_argument("--out-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: as the source)")
    p.add_argument("--stats-out", default=None)
    p.add_argument("--plan-out", default=None)
    p.add_argument("--stats", default=None, help="reuse a statistics file of this model instead of calibrating")
    p.add_argument("--plan", default=None, help="reuse a plan file of this model instead of --keep / --ratio")
    p.add_argument("--overwrite", action="store_true")
    auto_args(p)
    p.set_defaults(fn=cmd_prune)

    p = sub.add_parser("compare", help="one calibration, every metric x ratio x mode judged on validation data")
    model_arg(p)
    calib_args(p)
    p.add_argument("--valid", required=True, help="validation data: a file, folder, .npy or hf:NAME, or several "
                                                  "named sources NAME=SPEC,NAME=SPEC (reported each and pooled)")
    p.add_argument("--valid-samples", type=int, default=64, help="validation blocks per source (default 64)")
    p.add_argument("--metrics", default=None, help="comma-separated metrics (default: every registered one)")
    p.add_argument("--ratios", default="0.25,0.5", help="fractions of experts pruned (default 0.25,0.5)")
    p.add_argument("--modes", default="substitute,drop", help="substitute (novices) and/or drop")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the random metric (default 0,1,2)")
    p.add_argument("--scope", default="layer")
    p.add_argument("--out", required=True, help="folder for compare.md, compare.json and compare.png")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("eval", help="token-level perplexity of a checkpoint (original or pruned) on held-out data")
    model_arg(p)
    p.add_argument("--data", required=True, help="token ids .npy, text file/folder (.txt/.jsonl/.parquet), "
                                                 "or hf:NAME[:CONFIG][:SPLIT]; consecutive blocks from its start")
    p.add_argument("--num-samples", type=int, default=256, help="blocks evaluated")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per block")
    p.add_argument("--text-field", default="text")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("verify", help="check an exported folder against its sha256 manifest")
    p.add_argument("folder")
    p.set_defaults(fn=cmd_verify)
    return ap


def _check_numbers(args) -> None:
    """Options any command may take that must be positive."""
    for name in ("batch_size", "num_samples", "seq_len", "keep", "checkpoint_every", "valid_samples"):
        if getattr(args, name, None) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")


def _warn(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"mone-jax: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command; bad input: one line ``mone-jax: error: ...`` and exit code 2; the machine failing
    (disk full, out of memory): one line and exit code 1. ``--debug`` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    if not args.debug:
        warnings.showwarning = _warn
    if getattr(args, "quiet", False):  # the libraries' progress bars and notices too
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        _check_numbers(args)
        args.fn(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"mone-jax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mone-jax: interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError, RuntimeError) as e:
        if args.debug or (isinstance(e, RuntimeError) and "RESOURCE_EXHAUSTED" not in str(e)):
            raise
        print(f"mone-jax: error: {_failure(e)}", file=sys.stderr)
        return 1
    return 0


def _failure(e: BaseException) -> str:
    """One line for an error of the machine rather than of the input."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}{f': {e.filename}' if e.filename else ''} (disk full, file size limit or permissions?)"
    if isinstance(e, OSError):
        return str(e)
    return "out of memory: lower --batch-size or --seq-len, or spread the model with --mesh or --sequential"


if __name__ == "__main__":
    sys.exit(main())
