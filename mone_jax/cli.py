"""The ``mone-jax`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn

import numpy as np

from mone_jax.errors import UserError

FORMATS = ("substitution", "modepd", "drop")


def _calib_batches(args, cfg, model_dir: str | None, model=None) -> list[np.ndarray]:
    """Calibration token blocks from ``--calib`` cut into batches of ``--batch-size`` (read once: the
    preflight reads them before the model loads)."""
    if getattr(args, "batches", None) is not None:
        return args.batches
    from mone_jax.data import load_token_blocks

    spec = args.calib
    if spec.endswith(".npy") and args.num_samples is None and args.seq_len is None:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"calibration file '{spec}' does not exist")
        try:
            ids = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise UserError(f"'{spec}' is not a plain .npy array ({e})") from None
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
            raise UserError(f"'{spec}' must hold non-empty integer token ids [N, T], got {ids.dtype} {list(ids.shape)}")
    else:
        sampler = None
        if spec == "self" and model is not None:
            from mone_jax.sampling import sampler_for

            sampler = sampler_for(model)
        ids = load_token_blocks(spec, tokenizer_dir=model_dir, num_samples=args.num_samples or 128,
                                seq_len=args.seq_len or 512, seed=args.seed, text_field=args.text_field,
                                vocab_size=cfg.vocab_size, sampler=sampler)
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise UserError(f"calibration token ids must lie in [0, {cfg.vocab_size}), found {ids.min()}..{ids.max()}: "
                        "the data was tokenized for another model")
    if ids.shape[1] > cfg.max_position_embeddings:
        raise UserError(f"sequence length {ids.shape[1]} exceeds the model's max_position_embeddings "
                        f"{cfg.max_position_embeddings}: lower --seq-len")
    bs = max(1, args.batch_size)
    n = (ids.shape[0] // bs) * bs or ids.shape[0]
    return [ids[i:i + bs] for i in range(0, n, bs)]


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
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"'{args.tokens}' must hold integer token ids [B, T], got {ids.dtype} {list(ids.shape)}")
    V = model.config.vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        raise UserError(f"token ids must lie in [0, {V}), found {ids.min()}..{ids.max()}")
    logits = np.asarray(model(ids), np.float32)
    _atomic_npy(args.out, logits)
    print(f"wrote logits {list(logits.shape)} to {args.out}")


def _atomic_npy(path: str, arr: np.ndarray) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    try:
        np.save(tmp, arr)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _calibrate(args):
    """Statistics of --model: loaded layer by layer onto the --mesh, or streamed with --sequential."""
    from mone_jax.scale import calibrate_cli

    return calibrate_cli(args, _calib_batches)


def cmd_calibrate(args) -> None:
    from mone_jax.scale import init_distributed, is_writer

    init_distributed(args)
    stats = _calibrate(args)
    if is_writer():
        stats.save(args.stats_out)
    print(f"calibrated on {stats.tokens} tokens; statistics of {len(stats.layers)} MoE layers -> {args.stats_out}")


def cmd_plan(args) -> None:
    from mone_jax.planning import make_plan
    from mone_jax.stats import Stats

    stats = Stats.load(args.stats)
    plan = make_plan(stats, keep=args.keep, ratio=args.ratio, metric=args.metric, scope=args.scope, seed=args.seed)
    plan.save(args.plan_out)
    print(f"plan: keep {plan.keep} of {stats.num_experts} experts per layer ({args.metric}, {args.scope}) "
          f"-> {args.plan_out}")


def cmd_prune(args) -> None:
    from mone_jax.planning import make_plan
    from mone_jax.scale import init_distributed, is_writer
    from mone_jax.sequential import export_from_stats

    init_distributed(args)
    stats = _calibrate(args) if args.reused_stats is None else args.reused_stats
    plan = args.reused_plan or make_plan(stats, keep=args.keep, ratio=args.ratio, metric=args.metric,
                                         scope=args.scope, seed=args.seed, n_group=args.n_group)
    if not is_writer():
        return
    if args.stats_out:  # before the export: a failed export does not lose the calibration
        stats.save(args.stats_out)
    if args.plan_out:
        plan.save(args.plan_out)
    # streamed from the source checkpoint shard by shard: the pruned model is never assembled in memory
    summary = export_from_stats(args.model, args.out, stats, plan, fmt=args.format, dtype=args.dtype,
                                out_dtype=args.out_dtype, overwrite=args.overwrite)
    print(json.dumps(summary, indent=1))
    print(f"pruned checkpoint written to {args.out}")


def _check_out(args) -> None:
    """Refuse, before any work, an --out that the export could not or should not replace."""
    out, src = Path(args.out), Path(args.model).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file: give a folder")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"output folder '{out}' exists and is not empty: choose another --out or pass --overwrite")
    if out.resolve() == src or out.resolve() in src.parents:
        raise UserError(f"--out '{out}' would replace the model folder '{args.model}': choose another --out")
    for f in (args.stats_out, args.plan_out):
        if f and out.resolve() in Path(f).resolve().parents:
            raise UserError(f"'{f}' lies inside --out '{out}', which the export replaces: write it elsewhere")


def _check_file_out(path: str | None) -> None:
    if path and Path(path).is_dir():
        raise UserError(f"'{path}' is a folder: give a file name to write")


def _checked_config(folder: str):
    """The parsed config.json of ``folder``, its sizes checked for sense."""
    from mone_jax.convert.families import parse_config
    from mone_jax.convert.reader import read_config

    cfg = parse_config(read_config(folder))
    sizes = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
             "num_attention_heads": cfg.num_heads, "the number of experts": cfg.num_experts,
             "num_experts_per_tok": cfg.top_k}
    if bad := next((k for k, v in sizes.items() if v <= 0), None):
        raise UserError(f"config.json in '{folder}' gives {bad} = {sizes[bad]}, which must be positive: repair it")
    if cfg.top_k > cfg.num_experts:
        raise UserError(f"config.json in '{folder}' routes each token to {cfg.top_k} of {cfg.num_experts} experts: "
                        "num_experts_per_tok cannot exceed the experts; repair it")
    if not cfg.moe_layer_ids:
        raise UserError(f"'{folder}' has no MoE layer: there are no experts to prune")
    return cfg


def _preflight(args) -> None:
    """Check the model folder, the numbers and the files of ``calibrate`` / ``prune`` against the model's
    config.json and read the calibration data, all before the model loads (minutes for a large one)."""
    from mone_jax.convert.reader import CheckpointReader
    from mone_jax.planning import Plan, check_drop_keep, resolve_keep
    from mone_jax.stats import Stats

    _check_file_out(args.stats_out)
    cfg = _checked_config(args.model)
    CheckpointReader(args.model).close()  # safetensors weights present, headers sound
    if args.cmd == "prune":
        _check_file_out(args.plan_out)
        _check_out(args)
        args.reused_stats = args.reused_plan = None
        if args.stats:
            args.reused_stats = Stats.load(args.stats)
            args.reused_stats.check_matches(cfg.model_type, cfg.num_experts, cfg.moe_layer_ids, cfg.hidden_size)
        drop = args.format == "drop"
        args.n_group = cfg.n_group if drop else 1  # a drop plan keeps the same number in every router group
        if args.plan:
            args.reused_plan = Plan.load(args.plan).validate(cfg, "drop" if drop else "substitute")
        else:
            keep = resolve_keep(cfg.num_experts, args.keep, args.ratio)
            if drop:
                check_drop_keep(cfg, keep)
    if args.calib not in (None, "self"):
        args.batches = _calib_batches(args, cfg, args.model)


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
        path = Path(args.json)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(path)
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
        p.add_argument("--metric", default="mone")
        p.add_argument("--scope", default="layer")

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
    p.add_argument("stats", help="statistics file from `mone-jax calibrate`")
    plan_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan-out", required=True)
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
    p.set_defaults(fn=cmd_prune)

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


def _validate(args) -> None:
    from mone_jax.planning import SCOPES
    from mone_jax.scoring import METRICS

    if getattr(args, "metric", None) is not None and args.metric not in METRICS:
        raise UserError(f"unknown metric '{args.metric}': use one of {', '.join(METRICS)}")
    if getattr(args, "scope", None) is not None and args.scope not in SCOPES:
        raise UserError(f"unknown scope '{args.scope}': use one of {', '.join(SCOPES)}")
    if getattr(args, "format", None) is not None and args.format not in FORMATS:
        raise UserError(f"unknown format '{args.format}': use one of {', '.join(FORMATS)}")
    if getattr(args, "ratio", None) is not None and not 0 <= args.ratio < 1:
        raise UserError(f"--ratio must lie in [0, 1) (fraction of experts pruned), got {args.ratio}")
    if getattr(args, "keep", None) is not None and args.keep <= 0:
        raise UserError(f"--keep must be a positive number of experts, got {args.keep}")
    for name in ("batch_size", "num_samples", "seq_len"):
        if getattr(args, name, None) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.cmd == "prune":
        if args.model is None:
            from mone_jax.demo import demo_model_dir

            args.model = str(demo_model_dir())
            args.calib = args.calib or (None if args.stats else "self")
            args.out = args.out or "mone-demo-out"
            if args.keep is None and args.ratio is None and not args.plan:
                args.ratio = 0.25
            if args.calib == "self":  # 16 sampled sequences of 64 tokens: a first run in seconds
                args.num_samples = args.num_samples or 16
                args.seq_len = args.seq_len or 64
        if args.plan and (args.keep is not None or args.ratio is not None):
            raise UserError("--plan fixes the kept experts: drop --keep / --ratio")
        if args.keep is None and args.ratio is None and not args.plan:
            raise UserError("give the experts kept per layer with --keep N or the fraction pruned with --ratio R")
        if args.format == "drop" and args.scope == "model" and not args.plan:
            raise UserError("--format drop needs the same number of experts in every layer, which --scope model "
                            "does not give: use --scope layer or --format substitution")
        if args.stats and args.calib:
            raise UserError("--stats reuses computed statistics: drop --calib")
        if args.calib is None and not args.stats:
            raise UserError("give calibration data with --calib (token ids .npy, text files, hf:NAME, or self)")
        if args.out is None:
            raise UserError("give the output folder with --out")
    if args.cmd == "calibrate" and args.calib is None:
        raise UserError("give calibration data with --calib (token ids .npy, text files, hf:NAME, or self)")


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
        _validate(args)
        if args.cmd in ("calibrate", "prune"):
            _preflight(args)
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
