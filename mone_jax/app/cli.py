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

from mone_jax.base.errors import UserError
from mone_jax.base.files import atomic_write, atomic_write_text
from mone_jax.base.phases import configure, phase
from mone_jax.base.tokens import token_ids


def _load(args):
    from mone_jax.convert.load import load_hf

    phase("load", f"the model in '{args.model}' ({args.dtype})")
    return load_hf(args.model, dtype=args.dtype, progress=args.progress)


def cmd_inspect(args) -> None:
    from mone_jax.app.describe import describe

    print(describe(args.model, as_json=args.json))


def cmd_forward(args) -> None:
    from mone_jax.convert.load import config_of

    try:  # the inputs are checked before the model loads
        ids = np.load(args.tokens, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read token ids from '{args.tokens}' ({e}): give a .npy of int token ids") from None
    _file_out(args.logits_out)
    ids = token_ids(ids, config_of(args.model).vocab_size, f"'{args.tokens}'")
    model = _load(args)
    logits = np.asarray(model(ids), np.float32)
    atomic_write(args.logits_out, lambda tmp: tmp.write_bytes(_npy_bytes(logits)))
    print(f"wrote logits {list(logits.shape)} to {args.logits_out}")


def _file_out(path: str | None) -> None:
    if path and os.path.isdir(path):
        raise UserError(f"'{path}' is a folder: give a file name to write")


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def cmd_calibrate(args) -> None:
    phase("check", f"the options and '{args.model}' (importing JAX and transformers)")
    from mone_jax.app.jobs import batches_shape, calibrate_job
    from mone_jax.app.scale import finish, init_distributed, is_writer, run_calibration

    job = calibrate_job(args)
    init_distributed(job.scale)
    stats = run_calibration(job)
    if is_writer():
        stats.save(args.stats_out)
    finish(job)
    shape = "" if job.batches is None else " ({} sequences x {} tokens of '{}')".format(*batches_shape(job.batches),
                                                                                        job.calib)
    print(f"calibrated on {stats.tokens} tokens{shape}; statistics of {len(stats.layers)} MoE layers "
          f"-> {args.stats_out}")


def cmd_plan(args) -> None:
    from pathlib import Path

    from mone_jax.base.stats import Stats
    from mone_jax.convert.criteria import plan_for
    from mone_jax.prune.planning import describe_summary, plan_summary
    from mone_jax.prune.scoring import metric

    opts = dict(keep=args.keep, ratio=args.ratio, scope=args.scope, seed=args.seed, semantics=args.semantics)
    if args.metric == "auto" and args.semantics != "exact":
        raise UserError("--metric auto judges its candidates under exact semantics: name a metric with "
                        "--semantics reference, or drop --semantics")
    if args.metric == "auto":  # every candidate's pruned model judged on validation data
        from mone_jax.app.compare_job import select_for_plan

        plan = select_for_plan(args)
    elif metric(args.metric).needs_weights:  # weights only: the positional argument is the model folder
        model = args.stats_file
        if args.stats is not None or model is None or not Path(model).is_dir():
            raise UserError(f"metric '{args.metric}' scores the weights, not statistics: give the model folder "
                            f"instead of '{args.stats or model}' (mone-jax plan MODEL_DIR --metric {args.metric})")
        plan = plan_for(args.metric, model=model, progress=not args.quiet, **opts)
    else:
        if (args.stats is None) == (args.stats_file is None):
            raise UserError("give the statistics file once, with --stats FILE")
        path = args.stats or args.stats_file
        if Path(path).is_dir():
            raise UserError(f"'{path}' is a folder: metric '{args.metric}' needs a statistics file from "
                            "`mone-jax calibrate` (--stats FILE)")
        plan = plan_for(args.metric, stats=Stats.load(path), **opts)
    plan.save(args.plan_out)
    lp = next(iter(plan.layers.values()))
    E = len(lp.kept) + len(lp.novices)
    print(f"plan: {describe_summary(plan_summary(plan, E, args.ratio), E)} ({args.metric}, scope {args.scope}) "
          f"-> {args.plan_out}")


def cmd_prune(args) -> None:
    phase("check", f"the options and '{args.model or 'the demo model'}' (importing JAX and transformers)")
    from mone_jax import __version__
    from mone_jax.app.jobs import prune_job
    from mone_jax.app.scale import finish, init_distributed, is_writer, run_calibration
    from mone_jax.convert.criteria import plan_for
    from mone_jax.convert.export import export_from_stats
    from mone_jax.prune.card import folder_files
    from mone_jax.prune.planning import describe_summary, plan_summary

    job = prune_job(args)
    if job.calib is not None:
        init_distributed(job.calib.scale)
    n_group = job.config.n_group if job.format.mode == "drop" else 1  # drop: the same number in every group
    if job.metric == "auto" and job.plan is None:  # calibrates on what the validation split leaves
        from mone_jax.app.compare_job import select_for_prune

        phase("plan", "choosing the metric with the lowest validation loss (--metric auto)")
        stats, plan = select_for_prune(job, args.valid, args.valid_fraction, args.valid_samples, args.batch_size or 8)
    else:
        stats = job.stats if job.calib is None else run_calibration(job.calib)
        phase("plan", f"scoring experts ({job.metric}, scope {job.scope})" if job.plan is None else "the given plan")
        plan = job.plan or plan_for(job.metric, stats=stats, model=job.model, keep=job.keep, scope=job.scope,
                                    seed=job.seed, n_group=n_group, semantics=job.semantics,
                                    progress=not args.quiet)
    if not is_writer():
        return
    if job.stats_out:  # before the export: a failed export does not lose the calibration
        stats.save(job.stats_out)
    if job.plan_out:
        plan.save(job.plan_out)
    kept = plan_summary(plan, job.config.num_experts, job.ratio)
    c = job.calib
    calibration = ({"data": "none (weights-only metric)"} if stats is None else {"data": "reused statistics"}
                   if c is None else {"data": c.calib, "seed": c.seed, **({"mix": list(c.mix)} if c.mix else {})})
    extra = folder_files(source=job.model, out=str(job.out), plan=plan, stats=stats, fmt=job.format, kept=kept,
                         calibration=calibration, version=__version__)
    # streamed from the source checkpoint shard by shard: the pruned model is never assembled in memory
    phase("export", f"writing the {job.format.name} checkpoint to '{job.out}'")
    summary = export_from_stats(job.model, job.out, stats, plan, fmt=job.format.name, dtype=job.dtype,
                                out_dtype=job.out_dtype, overwrite=job.overwrite, extra_files=extra)
    if c is not None:
        finish(c)
    print(json.dumps({**summary, "plan": kept}, indent=1))  # stdout: JSON only, for scripts
    print(f"mone-jax: {describe_summary(kept, job.config.num_experts)}; wrote {job.format.name} checkpoint "
          f"{job.out}; next: mone-jax eval {job.out} --data HELD_OUT_TEXT", file=sys.stderr)


def cmd_compare(args) -> None:
    from mone_jax.app.compare_job import run_compare

    res = run_compare(args)
    t = res["timing"]
    print(f"{len(res['plans'])} plans judged on {', '.join(res['sources'])} in {t['total']:.1f} s (calibration "
          f"{t['calibration']:.1f} s, compilation {t['compile']:.1f} s, {t['forward_per_plan']:.2f} s per plan); "
          f"wrote {', '.join(res['written'].values())}")


def cmd_eval(args) -> None:
    if (args.data is None) == (args.tasks is None):
        raise UserError("give --data (perplexity) or --tasks (lm-evaluation-harness tasks), not both or neither")
    if args.tasks is not None:
        return _eval_tasks(args)
    from mone_jax.app.data import load_token_blocks
    from mone_jax.evaluate.perplexity import perplexity

    if args.data == "self":
        raise UserError("evaluate on held-out data (a file, folder, .npy or hf:NAME), not on the model's own samples")
    from mone_jax.convert.load import config_of

    cfg = config_of(args.model)
    if args.seq_len > cfg.max_position_embeddings:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                        f"{cfg.max_position_embeddings}: lower --seq-len")
    if args.result_out:
        _file_out(args.result_out)
    phase("data", f"reading {args.data} into {args.num_samples} blocks of {args.seq_len} tokens")
    ids = load_token_blocks(args.data, tokenizer_dir=args.model, num_samples=args.num_samples, seq_len=args.seq_len,
                            text_field=args.text_field, vocab_size=cfg.vocab_size, seed=args.seed or 0,
                            contiguous=args.seed is None)
    model = _load(args)
    result = perplexity(model, ids, batch_size=args.batch_size, progress=args.progress)
    result.update(model=args.model, data=args.data, num_samples=int(ids.shape[0]), seq_len=int(ids.shape[1]),
                  seed=args.seed)
    if args.result_out:
        atomic_write_text(args.result_out, json.dumps(result, indent=1) + "\n")
    print(f"perplexity {result['perplexity']:.4f} (mean NLL {result['nll']:.5f}) over {result['tokens']} tokens")


def _eval_tasks(args) -> None:
    from mone_jax.app.scale import init_distributed, is_writer

    init_distributed(args)
    from mone_jax.app.harness import evaluate_tasks, markdown, write_results

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks is empty: name lm-eval tasks, e.g. --tasks arc_easy,piqa")
    results = evaluate_tasks(args.model, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                             include_path=args.include_path, batch_size=args.batch_size, mesh=args.mesh,
                             dtype=args.dtype, seed=args.seed or 0, progress=args.progress)
    print(markdown(results))
    if args.out and is_writer():
        paths = write_results(results, args.out)
        print(f"wrote {paths[0]} and {paths[1]}")


def cmd_diff(args) -> int:
    from mone_jax.app.diff import compare, table, token_ids_for
    from mone_jax.convert.load import config_of

    if args.tokens is not None and args.text is not None:
        raise UserError("give --tokens or --text, not both")
    if args.tol is not None and args.tol < 0:
        raise UserError(f"--tol must be >= 0, got {args.tol}")
    ids = token_ids_for(args.model, args.tokens, args.text, config_of(args.model).vocab_size)
    report = compare(args.model, args.other, ids, vs_torch=args.vs_torch, dtype=args.dtype)
    failed = args.tol is not None and report["logits"]["max_abs"] > args.tol
    report["tol"], report["passed"] = args.tol, not failed
    print(json.dumps(report, indent=1) if args.json else table(report))
    if failed:
        print(f"mone-jax: logits differ by {report['logits']['max_abs']:.3g} > --tol {args.tol}", file=sys.stderr)
    return 1 if failed else 0


def cmd_generate(args) -> None:
    from pathlib import Path

    from mone_jax.app.data import load_tokenizer
    from mone_jax.model.decoding import generate

    if args.max_new_tokens < 0 or args.temperature < 0:
        raise UserError("--max-new-tokens and --temperature must be >= 0")
    tokenizer = load_tokenizer(args.model, args.model)
    prompts = [tokenizer(text)["input_ids"] for text in args.prompt]
    if not all(prompts):
        raise UserError("a --prompt encodes to no tokens; give some text")
    model = _load(args)
    phase("generate", f"{len(prompts)} prompt(s), up to {args.max_new_tokens} new tokens (the first batch compiles)")
    gen_cfg = Path(args.model) / "generation_config.json"  # its EOS ids (a list for chat models) win
    eos = json.loads(gen_cfg.read_text()).get("eos_token_id") if gen_cfg.is_file() else None
    new = generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                   eos_token_id=eos, pad_id=tokenizer.pad_token_id)
    for prompt, tokens in zip(prompts, new):
        print(tokenizer.decode(prompt + tokens, skip_special_tokens=True))


def cmd_verify(args) -> None:
    from mone_jax.convert.writer import verify_export

    problems = verify_export(args.folder)
    if len(problems) == 1:
        raise UserError(f"'{args.folder}' failed verification: {problems[0]}")
    if problems:  # every problem, one per line, then the verdict
        print("\n".join(f"  {p}" for p in problems), file=sys.stderr)
        raise UserError(f"'{args.folder}' failed verification: the {len(problems)} problems above; re-export it")
    print(f"{args.folder}: all files match the manifest")


class _Help(argparse.HelpFormatter):
    """Help that states each option's default (unless it has none, or the help text says it already)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS)) \
                and "default" not in text:
            text += f" (default: {action.default})"
        return text


# command -> {former option name: current one}: one word per concept (``--*-out FILE`` writes a file,
# ``--out DIR`` the output folder, ``--stats FILE`` reads statistics)
RENAMED = {"forward": {"--out": "--logits-out"}, "eval": {"--json": "--result-out"}}


def one_of(names, what: str = "") -> str:
    """Help text listing a registry's names (choices are checked by the registry, with its own message)."""
    return f"{what}{': ' if what else ''}one of {', '.join(names)}"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (exit code 2) and defaults in the help; former option names
    (:data:`RENAMED`) still work and are not shown."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _Help)
        super().__init__(*a, **kw)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        cmd = next((a for a in args if not a.startswith("-")), None)
        renamed = RENAMED.get(cmd, {})
        args = [renamed.get(a, a) for a in args]
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"mone-jax: error: {message} (see `{self.prog} --help`)\n")


class _Commands(argparse._SubParsersAction):
    """Subcommands that also take the global options after their name (``mone-jax prune --debug``)."""

    def add_parser(self, name, **kw):
        p = super().add_parser(name, **kw)
        global_args(p, argparse.SUPPRESS)
        return p


def global_args(p: argparse.ArgumentParser, default) -> None:
    """--debug and --quiet, before or after the command name (``default``: False at the top level, SUPPRESS
    in a command so that an option given before the command name survives)."""
    p.add_argument("--debug", action="store_true", default=default, help="show Python tracebacks")
    p.add_argument("--quiet", action="store_true", default=default, help="no progress or phase lines")
    p.add_argument("--compile-cache", default=None if default is False else default, metavar="DIR",
                   help="persistent XLA compilation cache folder, or 'off' (default: $MONE_JAX_COMPILE_CACHE, "
                        "else ~/.cache/mone-jax/xla): a rerun with the same shapes compiles nothing")


def build_parser() -> argparse.ArgumentParser:
    from mone_jax import __version__
    from mone_jax.convert.formats import FORMATS
    from mone_jax.prune.planning import SCOPES
    from mone_jax.prune.scoring import METRICS

    ap = _Parser(prog="mone-jax", description="MoNE expert pruning for MoE language models (JAX).")
    ap.add_argument("--version", action="version", version=f"mone-jax {__version__}")
    global_args(ap, False)
    ap.register("action", "parsers", _Commands)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def model_arg(p, optional=False):
        if optional:
            p.add_argument("model", nargs="?", default=None, help="Hugging Face model folder (default: the demo model)")
        else:
            p.add_argument("model", help="Hugging Face model folder (safetensors)")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="compute dtype")

    def calib_args(p):
        p.add_argument("--calib", default=None, help="token ids .npy, text file/folder (.txt/.jsonl/.parquet), "
                                                     "hf:NAME[:CONFIG][:SPLIT], 'self', or a mix SOURCE:SHARE,"
                                                     "SOURCE:SHARE,... or recipe .yaml/.mix.json (README)")
        p.add_argument("--num-samples", type=int, default=None, help="calibration sequences (default 128)")
        p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512, or the model's max_position_embeddings if smaller)")
        p.add_argument("--text-field", default="text", help="field holding the text in .jsonl / .parquet / hub rows")
        p.add_argument("--batch-size", type=int, default=None,
                       help="sequences per calibration step (default: about 4096 tokens per device, more for models "
                            "with many experts per routed token, capped by memory; 8 with --semantics reference)")
        p.add_argument("--seed", type=int, default=0, help="seed of the data sampling (and of --metric random)")
        from mone_jax.app.scale import add_args

        add_args(p)

    def semantics_arg(p):
        p.add_argument("--semantics", default="exact", choices=["exact", "reference"],
                       help="exact statistics (default), or as the MoNE reference code computes them "
                            "(docs/formats.md)")

    def plan_args(p, required=True):
        g = p.add_mutually_exclusive_group(required=required)
        g.add_argument("--keep", type=int, help="experts kept per MoE layer")
        g.add_argument("--ratio", type=float, help="fraction of experts pruned, in [0, 1)")
        p.add_argument("--metric", default="mone", help=one_of((*METRICS, "auto"), "expert score")
                       + " ('auto': the lowest validation loss)")
        p.add_argument("--scope", default="layer", help=one_of(SCOPES, "where the keep count applies") +
                       " ('layer': exactly N in every MoE layer; 'model': N x layers overall, at least one per layer)")

    def auto_args(p):
        p.add_argument("--valid", default=None, help="--metric auto: validation data disjoint from the calibration "
                                                     "(a file, folder, .npy, hf:NAME, or NAME=SPEC,NAME=SPEC)")
        p.add_argument("--valid-fraction", type=float, default=0.1,
                       help="--metric auto without --valid: share of the calibration blocks held out (default 0.1)")
        p.add_argument("--valid-samples", type=int, default=64, help="validation blocks per source (default 64)")

    p = sub.add_parser("inspect", help="family, layers, experts and parameter counts of a checkpoint")
    p.add_argument("model", help="Hugging Face model folder, original or pruned")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("forward", help="logits for given token ids (cross-framework check)")
    model_arg(p)
    p.add_argument("--tokens", required=True, help=".npy of int token ids [B, T]")
    p.add_argument("--logits-out", required=True, help="logits file to write (.npy, float32 [B, T, vocab])")
    p.set_defaults(fn=cmd_forward)

    p = sub.add_parser("calibrate", help="per-expert statistics over calibration data")
    model_arg(p)
    calib_args(p)
    p.add_argument("--stats-out", required=True, help="statistics file to write (.safetensors)")
    semantics_arg(p)
    p.set_defaults(fn=cmd_calibrate)

    p = sub.add_parser("plan", help="score experts and choose kept / novices")
    p.add_argument("--stats", help="statistics file from `mone-jax calibrate`")
    p.add_argument("stats_file", nargs="?", metavar="MODEL_DIR",
                   help="the model folder, for a weights-only metric (aimer: no statistics needed)")
    plan_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of --metric random")
    p.add_argument("--plan-out", required=True, help="plan file to write (.json)")
    semantics_arg(p)
    auto_args(p)
    p.add_argument("--format", default="substitution", help="--metric auto: the export format candidates are "
                                                            "judged in (its prune mode)")
    p.add_argument("--seq-len", type=int, default=512, help="--metric auto: tokens per validation block")
    p.add_argument("--batch-size", type=int, default=8, help="--metric auto: blocks per forward pass")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="--metric auto: compute dtype")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("prune", help="calibrate, plan, prune and export in one go",
                       description="Calibrate, plan, prune and export in one go. With no MODEL: the shipped demo "
                                   "model with --calib self --num-samples 16 --seq-len 64 --ratio 0.25 "
                                   "--out mone-demo-out (a first run in under a minute, nothing downloaded).")
    model_arg(p, optional=True)
    calib_args(p)
    plan_args(p, required=False)
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--format", default="substitution", help=one_of(FORMATS, "export format"))
    p.add_argument("--out-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: as the source)")
    p.add_argument("--stats-out", default=None, help="also write the statistics to this file")
    p.add_argument("--plan-out", default=None, help="also write the plan to this file")
    p.add_argument("--stats", default=None, help="reuse a statistics file of this model instead of calibrating")
    p.add_argument("--plan", default=None, help="reuse a plan file of this model instead of --keep / --ratio")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    semantics_arg(p)
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
    p.add_argument("--modes", default="substitution,drop", help="substitution (novices) and/or drop")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the random metric (default 0,1,2)")
    p.add_argument("--scope", default="layer", help=one_of(SCOPES, "where the keep count applies"))
    p.add_argument("--out", required=True, help="folder for compare.md, compare.json and compare.png")
    p.set_defaults(fn=cmd_compare)


    p = sub.add_parser("eval", help="perplexity (--data) or lm-evaluation-harness task accuracy (--tasks) of a "
                                    "checkpoint, original or pruned, in JAX")
    model_arg(p)
    p.add_argument("--data", default=None, help="token ids .npy, text file/folder (.txt/.jsonl/.parquet), "
                                                "or hf:NAME[:CONFIG][:SPLIT]; consecutive blocks from its start "
                                                "(random windows with --seed)")
    p.add_argument("--num-samples", type=int, default=256, help="--data: blocks evaluated")
    p.add_argument("--seq-len", type=int, default=512, help="--data: tokens per block")
    p.add_argument("--seed", type=int, default=None, help="--data: blocks at seeded random offsets of the "
                                                          "documents in a seeded order (the demo model card's "
                                                          "windowing); --tasks: lm-eval's seeds (default 0)")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl / .parquet / hub rows")
    p.add_argument("--batch-size", type=int, default=8, help="blocks (--data) or requests (--tasks) per forward pass")
    p.add_argument("--result-out", default=None, help="--data: also write the result as JSON to this file")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval task names (pip install 'mone-jax[eval]')")
    p.add_argument("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples (default: the task's)")
    p.add_argument("--limit", type=float, default=None, help="--tasks: documents per task (a fraction if < 1)")
    p.add_argument("--include-path", default=None, help="--tasks: folder of extra task YAML files")
    p.add_argument("--out", default=None, help="--tasks: folder for results.json (lm-eval's format) and results.md")
    from mone_jax.app.scale import add_distributed_args, add_mesh_args

    add_mesh_args(p)
    add_distributed_args(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("diff", help="compare the logits (and per-layer outputs) of two checkpoints, or of one "
                                    "in JAX and in transformers (--vs-torch)")
    model_arg(p)
    p.add_argument("other", nargs="?", default=None, help="second checkpoint folder B (omit with --vs-torch)")
    p.add_argument("--vs-torch", action="store_true", help="compare A in JAX with A in transformers (needs torch)")
    p.add_argument("--tokens", default=None, help=".npy of int token ids [B, T]")
    p.add_argument("--text", default=None, help="text tokenized with A's tokenizer (default: a fixed sample)")
    p.add_argument("--tol", type=float, default=None, help="exit with code 1 when the max |logit difference| "
                                                           "exceeds this")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(fn=cmd_diff)

    p = sub.add_parser("generate", help="continue text prompts with the model (KV-cache decoding)")
    model_arg(p)
    p.add_argument("--prompt", action="append", required=True, help="text to continue (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens added to each prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled tokens")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("verify", help="check an exported folder against its sha256 manifest")
    p.add_argument("folder", help="folder written by `mone-jax prune`")
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
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # e.g. "PyTorch was not found": not needed here
    configure(not args.quiet)  # phase lines on stderr; bars only where a terminal redraws them
    args.progress = not args.quiet and sys.stderr.isatty()
    if not args.debug:
        warnings.showwarning = _warn
    if getattr(args, "quiet", False):  # the libraries' progress bars and notices too
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        _check_numbers(args)
        clock = _compile_cache(args)
        code = args.fn(args) or 0
        if clock is not None:
            phase("done", clock.describe())
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
    return code


def _compile_cache(args):
    """The persistent compilation cache configured for a command that compiles; its compile clock started."""
    if args.cmd in ("inspect", "verify"):
        return None
    from mone_jax.base.compile_cache import CompileClock, configure

    configure(args.compile_cache)
    return CompileClock().start()


def _failure(e: BaseException) -> str:
    """One line for an error of the machine rather than of the input."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}{f': {e.filename}' if e.filename else ''} (disk full, file size limit or permissions?)"
    if isinstance(e, OSError):
        return str(e)
    return "out of memory: lower --batch-size or --seq-len, or spread the model with --mesh or --sequential"


if __name__ == "__main__":
    sys.exit(main())
