"""The ``mone-jax`` command line's options: the parser, its help formatting, and the checks argparse cannot
state. Light at import (no JAX): ``mone-jax --help`` answers at once."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from mone_jax.app.commands import (
    calibrate_cmd,
    compare_cmd,
    diff_cmd,
    eval_cmd,
    forward_cmd,
    generate_cmd,
    inspect_cmd,
    plan_cmd,
    prune_cmd,
    verify_cmd,
)
from mone_jax.base.errors import UserError
from mone_jax.base.precision import PRECISIONS


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
    p.add_argument("--quiet", action="store_true", default=default,
                   help="errors only on stderr: no progress, phase, warning or summary lines")
    p.add_argument("--compile-cache", default=None if default is False else default, metavar="DIR",
                   help="persistent XLA compilation cache folder, or 'off' (default: $MONE_JAX_COMPILE_CACHE, "
                        "else ~/.cache/mone-jax/xla): a rerun with the same shapes compiles nothing")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; ``args.run(args)`` runs the parsed one."""
    from mone_jax import __version__
    from mone_jax.convert.formats import FORMATS
    from mone_jax.pruning.planning import FITS, GREEDY, SCOPES
    from mone_jax.pruning.scoring import METRICS

    ap = _Parser(prog="mone-jax", description="MoNE expert pruning for MoE language models (JAX).")
    ap.add_argument("--version", action="version", version=f"mone-jax {__version__}")
    global_args(ap, False)
    ap.register("action", "parsers", _Commands)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def model_arg(p, optional=False):
        if optional:
            p.add_argument("model", nargs="?", default=None, help=f"{MODEL_HELP} (default: the demo model)")
        else:
            p.add_argument("model", help=MODEL_HELP)
        revision_arg(p)
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="compute dtype")
        add_precision_arg(p)

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
        add_scale_args(p)

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
        p.add_argument("--scope", default="layer", help=one_of((*SCOPES, GREEDY), "where the keep count applies") +
                       " ('layer': exactly N in every MoE layer; 'model': N x layers overall, at least one per layer;"
                       " 'greedy', prune only: N x layers overall, each novice the one that raises the validation "
                       "loss least, at least top-k kept per layer)")

    def auto_args(p):
        p.add_argument("--valid", default=None, help="--metric auto: validation data disjoint from the calibration "
                                                     "(a file, folder, .npy, hf:NAME, or NAME=SPEC,NAME=SPEC)")
        p.add_argument("--valid-fraction", type=float, default=0.1,
                       help="--metric auto without --valid: share of the calibration blocks held out (default 0.1)")
        p.add_argument("--valid-samples", type=int, default=64, help="validation blocks per source (default 64)")
        greedy_args(p)

    def greedy_args(p):
        p.add_argument("--candidates", default="4", help="--scope greedy: the experts tried per layer and step, "
                                                         "the lowest-scored by --metric, or 'all' (default 4)")
        p.add_argument("--search", default="lazy", choices=["lazy", "exhaustive"],
                       help="--scope greedy: 'lazy' measures again only the candidate whose earlier rise in loss "
                            "is least (CELF), 'exhaustive' every candidate at every step")

    p = sub.add_parser("inspect", help="family, layers, experts and parameter counts of a checkpoint")
    p.add_argument("model", help="Hugging Face model folder, original or pruned, or a hub id ORG/NAME[@REVISION]")
    revision_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=inspect_cmd.run)

    p = sub.add_parser("forward", help="logits for given token ids (cross-framework check)")
    model_arg(p)
    p.add_argument("--tokens", required=True, help=".npy of int token ids [B, T]")
    p.add_argument("--logits-out", required=True, help="logits file to write (.npy, float32 [B, T, vocab])")
    p.set_defaults(run=forward_cmd.run)

    p = sub.add_parser("calibrate", help="per-expert statistics over calibration data")
    model_arg(p)
    calib_args(p)
    p.add_argument("--stats-out", required=True, help="statistics file to write (.safetensors)")
    semantics_arg(p)
    p.set_defaults(run=calibrate_cmd.run)

    p = sub.add_parser("plan", help="score experts and choose kept / novices")
    p.add_argument("--stats", help="statistics file from `mone-jax calibrate`")
    p.add_argument("stats_file", nargs="?", metavar="MODEL_DIR",
                   help="the model folder or hub id, for a weights-only metric (aimer: no statistics needed) or "
                        "--metric auto")
    revision_arg(p)
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
    add_precision_arg(p, "--metric auto: ")
    p.set_defaults(run=plan_cmd.run)

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
    p.add_argument("--fit", default=None,
                   help=f"fit the novices ({', '.join(FITS)} or none): 'weighted', the routing-weighted mean sum g^2 y "
                        "/ sum g^2; 'kd', distillation of novices, MoE routers and MoE-input norms to the original "
                        "model on the calibration tokens, stopped early on the validation data; 'kd-down', the same "
                        "and the kept experts' down projections (more memory: Adam's moments of them) (default: none, plain "
                        "means); with --metric auto a comma-separated list, each a candidate (as a --scope list)")
    semantics_arg(p)
    auto_args(p)
    p.set_defaults(run=prune_cmd.run)

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
    p.add_argument("--scopes", default=None, help="comma-separated scopes, each a candidate (layer, model, greedy; "
                                                  "default: --scope alone)")
    p.add_argument("--fits", default=None, help="comma-separated fits, each a candidate (none, weighted, kd, kd-down; "
                                                "default: none alone)")
    greedy_args(p)
    p.add_argument("--out", required=True, help="folder for compare.md, compare.json and compare.png")
    p.set_defaults(run=compare_cmd.run)

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
    add_mesh_args(p)
    add_distributed_args(p)
    p.set_defaults(run=eval_cmd.run, precheck=eval_cmd.precheck)

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
    p.set_defaults(run=diff_cmd.run)

    p = sub.add_parser("generate", help="continue text prompts with the model (KV-cache decoding)")
    model_arg(p)
    p.add_argument("--prompt", action="append", required=True, help="text to continue (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens added to each prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled tokens")
    p.set_defaults(run=generate_cmd.run)

    p = sub.add_parser("verify", help="check an exported folder against its sha256 manifest")
    p.add_argument("folder", help="folder written by `mone-jax prune`")
    p.set_defaults(run=verify_cmd.run)
    return ap


MODEL_HELP = ("Hugging Face model folder (safetensors), or a hub id ORG/NAME[@REVISION] fetched into the Hugging Face "
              "cache (its safetensors, config and tokenizer files; HF_HUB_OFFLINE: the cache only)")


def revision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub id given without @REVISION "
                                                    "(default: main)")


def add_precision_arg(p: argparse.ArgumentParser, what: str = "") -> None:
    """``--precision`` of the commands that run the model (entered around the whole command by the CLI)."""
    p.add_argument("--precision", default=None, choices=list(PRECISIONS),
                   help=what + "precision of the float32 matrix products: 'highest' (full float32) or 'default' "
                               "(the backend's: one bfloat16 pass on TPU, TF32 on recent GPUs, float32 on CPU); "
                               "default: highest with --dtype float32, default with bfloat16 / float16")


def add_scale_args(p: argparse.ArgumentParser) -> None:
    """The scale-out flags of ``calibrate``, ``prune`` and ``compare``: mesh, layer streaming, resumable
    checkpoints, multi-host."""
    g = add_mesh_args(p)
    g.add_argument("--sequential", action="store_true", help="stream one decoder layer at a time from the "
                                                             "checkpoint (models larger than memory)")
    g.add_argument("--offload-dir", default=None, help="--sequential: keep hidden states in a memory-mapped "
                                                       "file here instead of RAM")
    g.add_argument("--checkpoint-dir", default=None, help="save running statistics here and resume from them")
    g.add_argument("--checkpoint-every", type=int, default=50, help="batches between checkpoints (default 50)")
    add_distributed_args(p)


def add_mesh_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--mesh`` (in a new ``scale`` group, returned)."""
    g = p.add_argument_group("scale")
    g.add_argument("--mesh", default="auto", help="device mesh data=D,expert=X (D*X = devices; the experts are "
                                                  "padded to a multiple of X); 'auto': pure data parallel unless the model needs "
                                                  "its experts split to fit device memory")
    return g


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    """The multi-host flags (read by :func:`mone_jax.app.distributed.init_distributed`)."""
    g = p.add_argument_group("multi-host (jax.distributed; every process runs the same command)")
    g.add_argument("--distributed", action="store_true", help="detect the cluster (Cloud TPU pods, SLURM, ...)")
    g.add_argument("--coordinator", default=os.environ.get("MONE_COORDINATOR"),
                   help="HOST:PORT of process 0 (env MONE_COORDINATOR)")
    g.add_argument("--num-processes", type=int, default=os.environ.get("MONE_NUM_PROCESSES"),
                   help="env MONE_NUM_PROCESSES")
    g.add_argument("--process-id", type=int, default=os.environ.get("MONE_PROCESS_ID"), help="env MONE_PROCESS_ID")
    g.add_argument("--heartbeat-timeout", type=int, default=100,
                   help="seconds after which a silent peer fails the run (default 100)")


def check_numbers(args) -> None:
    """Options any command may take that must be positive (argparse checks types, not ranges)."""
    for name in ("batch_size", "num_samples", "seq_len", "keep", "checkpoint_every", "valid_samples"):
        if getattr(args, name, None) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")


