"""Typed jobs of ``calibrate`` and ``prune``: every option resolved and every input checked against the
model's config.json before the first heavy step (model load, calibration, export)."""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mone_jax.app.mix import parse_mix
from mone_jax.base.config import ModelConfig
from mone_jax.base.errors import Problems, UserError
from mone_jax.base.phases import phase
from mone_jax.base.stats import Stats, check_semantics
from mone_jax.base.tokens import token_ids
from mone_jax.convert.export import check_quantized_export
from mone_jax.convert.families import parse_config
from mone_jax.convert.formats import ExportFormat, export_format
from mone_jax.convert.reader import CheckpointReader, read_config
from mone_jax.pruning.planning import FITS, GREEDY, NO_FIT, SCOPES, Plan, check_drop_keep, resolve_keep
from mone_jax.pruning.scoring import METRICS, metric

CALIB_HELP = "give calibration data with --calib (token ids .npy, text files, hf:NAME, or self)"
SELF_CALIBRATION = ("calibrating on the model's own samples (--calib self): the pruned model keeps what they "
                    "need and can forget sources they rarely show (the demo loses its Bible text); calibrate on data "
                    "like the data it must serve, a balanced mix of its sources (--calib a.txt:0.5,b.txt:0.5), and "
                    "check pruned models against each other with `mone-jax compare`")


@dataclass(frozen=True)
class ScaleOptions:
    """Mesh, layer streaming, resumable checkpoints and multi-host options (``arguments.add_scale_args``)."""

    mesh: str = "auto"
    sequential: bool = False
    offload_dir: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    distributed: bool = False
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout: int = 100


@dataclass(frozen=True)
class CalibJob:
    """What a calibration run needs; ``batches`` were read before the model loads (None: ``--calib self``,
    sampled from the loaded model)."""

    model: str
    config: ModelConfig
    dtype: str
    calib: str
    num_samples: int
    seq_len: int
    seed: int
    text_field: str
    batch_size: int
    batches: tuple[np.ndarray | dict, ...] | None
    scale: ScaleOptions
    progress: bool
    semantics: str = "exact"  # stats.SEMANTICS, recorded in the statistics
    mix: tuple[dict, ...] = ()  # a calibration mix: per source its source, share, blocks, tokens and documents
    data: dict | None = None  # one text source: the tokens per document its blocks hold (data.token_blocks)
    batch_given: bool = False  # batch_size from --batch-size (else chosen here: auto_batch_size)


@dataclass(frozen=True)
class PruneJob:
    """Calibrate (or reuse ``stats``), plan (or reuse ``plan``), prune and export."""

    model: str
    config: ModelConfig
    dtype: str  # compute dtype (novices are rounded through it, as the in-memory prune does)
    calib: CalibJob | None  # None: the statistics are reused, or not needed (weights-only metric, drop)
    stats: Stats | None
    plan: Plan | None
    keep: int
    metric: str
    scope: str
    seed: int
    format: ExportFormat
    out: Path
    stats_out: str | None
    plan_out: str | None
    out_dtype: str | None
    overwrite: bool
    ratio: float | None = None  # the requested pruned fraction, when given as one
    semantics: str = "exact"  # of the plan made here (stats.SEMANTICS)
    fit: str | None = None  # --fit: how the novices are fitted (planning.FITS)
    scopes: tuple[str, ...] = ()  # --metric auto over several --scope values (each a candidate)
    fits: tuple[str | None, ...] = ()  # ... and several --fit values (None: plain means)


def checked_config(folder: str) -> ModelConfig:
    """The parsed config.json of ``folder``, its sizes checked for sense, its weights' headers read."""
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
    CheckpointReader(folder).close()  # safetensors weights present, headers sound
    return cfg


def known_metric(name: str) -> None:
    """Refuse a ``--metric`` that is neither registered nor ``auto``."""
    if name != "auto" and name not in METRICS:
        raise UserError(f"unknown metric '{name}': use one of {', '.join((*METRICS, 'auto'))}")


def file_out(path: str | None) -> None:
    """Refuse an output file option that names a folder, before any work."""
    if path and Path(path).is_dir():
        raise UserError(f"'{path}' is a folder: give a file name to write")


def calib_job(args: argparse.Namespace, model: str, cfg: ModelConfig, calib: str, *, num_samples: int | None = None,
              seq_len: int | None = None) -> CalibJob:
    """A checked calibration job; text and token files are read (and checked) now."""
    scale = ScaleOptions(**{k: getattr(args, k) for k in ScaleOptions.__dataclass_fields__})
    if scale.offload_dir and not scale.sequential:
        raise UserError("--offload-dir applies to --sequential runs only")
    if scale.sequential and calib == "self":
        raise UserError("--calib self samples from the loaded model: it cannot be combined with --sequential")
    semantics = check_semantics(getattr(args, "semantics", "exact"))
    raw_npy = calib.endswith(".npy") and args.num_samples is None and args.seq_len is None
    seq = seq_len or args.seq_len or min(512, cfg.max_position_embeddings)
    if raw_npy and Path(calib).is_file():
        try:
            seq = np.load(calib, mmap_mode="r", allow_pickle=False).shape[-1]
        except (ValueError, OSError, IndexError):
            pass  # read_batches reports it
    samples = num_samples or args.num_samples or 128
    if raw_npy and Path(calib).is_file():
        try:
            samples = int(np.prod(np.load(calib, mmap_mode="r", allow_pickle=False).shape[:-1]))
        except (ValueError, OSError, IndexError):
            pass  # read_batches reports it
    batch = args.batch_size or (8 if semantics == "reference" else auto_batch_size(model, cfg, seq, scale, args.dtype))
    if not _multi_host(scale):  # before any weight is read; multi-host runs may not touch JAX yet
        batch = memory_preflight(model, cfg, args.dtype, batch, seq, samples * seq, scale, args.batch_size is not None)
    job = CalibJob(model, cfg, args.dtype, calib, num_samples or args.num_samples or 128, seq, args.seed,
                   args.text_field, batch, None, scale, getattr(args, "progress", not args.quiet), semantics,
                   batch_given=args.batch_size is not None)
    if job.seq_len > cfg.max_position_embeddings and not raw_npy:  # before any tokenizing
        raise UserError(f"sequence length {job.seq_len} exceeds the model's max_position_embeddings "
                        f"{cfg.max_position_embeddings}: lower --seq-len")
    if calib == "self":
        warnings.warn(SELF_CALIBRATION, stacklevel=2)
        return job
    if (mix := parse_mix(calib)) is not None:
        from mone_jax.app.mix import mix_blocks  # tokenizers and datasets: only when needed

        phase("data", f"reading the mix of {len(mix)} sources into {job.num_samples} blocks of {job.seq_len} tokens")
        ids, record = mix_blocks(mix, tokenizer_dir=model, num_samples=job.num_samples, seq_len=job.seq_len,
                                 seed=job.seed, text_field=job.text_field, vocab_size=cfg.vocab_size)
        return replace(job, batches=_batches(job, ids), mix=tuple(record))
    phase("data", f"reading {job.calib}" + ("" if raw_npy or calib.endswith(".npy") else
                                            f" into {job.num_samples} blocks of {job.seq_len} tokens"))
    ids, record = read_blocks(job, raw_npy=raw_npy)
    return replace(job, batches=_batches(job, ids), data=record if "documents" in record else None)


def _multi_host(scale: ScaleOptions) -> bool:
    return scale.distributed or any(v is not None for v in (scale.coordinator, scale.num_processes, scale.process_id))


def auto_batch_size(model: str, cfg: ModelConfig, seq_len: int, scale: ScaleOptions, dtype: str = "float32") -> int:
    """:func:`~mone_jax.calib.calibration.default_batch_size` for this machine: every device data-parallel, the memory of
    one device (the host's available RAM on CPU) less the weights it holds in the compute ``dtype`` (the whole
    model, or one layer with --sequential; not the file size: float32 doubles a bf16 file). Multi-host runs may
    not touch JAX before ``jax.distributed`` starts: one device's share, memory unchecked."""
    from mone_jax.app.preflight import footprint, host_available, source_of
    from mone_jax.calib.calibration import default_batch_size

    if _multi_host(scale):
        return default_batch_size(cfg, seq_len)
    import jax

    devices = jax.devices()
    f = footprint(cfg, dtype, source_of(model, cfg))
    weights = f.layer + f.load_layer if scale.sequential else f.total + f.load_whole
    stats = devices[0].memory_stats() or {}
    if "bytes_limit" in stats:
        memory = stats["bytes_limit"] - (weights if scale.sequential else f.replicated + f.experts / len(devices))
    else:
        memory = (host_available() - weights) / len(devices)
    return default_batch_size(cfg, seq_len, len(devices), max(memory, 1.0))


def memory_preflight(model: str, cfg: ModelConfig, dtype: str, batch: int, seq_len: int, tokens: int,
                     scale: ScaleOptions, batch_given: bool) -> int:
    """The batch size after :func:`~mone_jax.app.preflight.check` (a refusal when nothing fits)."""
    import jax

    from mone_jax.app.preflight import check, source_of

    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    return check(cfg, dtype, batch, seq_len, tokens, sequential=scale.sequential, batch_given=batch_given,
                 devices=jax.device_count(), device_bytes=limit, source=source_of(model, cfg))


def read_batches(job: CalibJob, sampler=None, *, raw_npy: bool = False) -> tuple[np.ndarray | dict, ...]:
    """Calibration token blocks cut into batches of ``batch_size``; a ``.npy`` given without --num-samples /
    --seq-len is used as it is."""
    return _batches(job, read_blocks(job, sampler, raw_npy=raw_npy)[0])


def read_blocks(job: CalibJob, sampler=None, *, raw_npy: bool = False) -> tuple[np.ndarray, dict]:
    """Calibration token blocks (:func:`read_batches`) and what they hold (:func:`~mone_jax.app.data.token_blocks`;
    empty for a raw .npy)."""
    cfg = job.config
    if raw_npy:
        path = Path(job.calib)
        if not path.is_file():
            raise UserError(f"calibration file '{job.calib}' does not exist")
        try:
            ids = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise UserError(f"'{job.calib}' is not a plain .npy array ({e})") from None
        return ids, {}
    from mone_jax.app.data import token_blocks  # tokenizers and datasets: only when needed

    return token_blocks(job.calib, tokenizer_dir=job.model, num_samples=job.num_samples, seq_len=job.seq_len,
                        seed=job.seed, text_field=job.text_field, vocab_size=cfg.vocab_size, sampler=sampler)


def _batches(job: CalibJob, ids: np.ndarray) -> tuple[np.ndarray | dict, ...]:
    """Blocks ``ids`` checked against the model and cut into batches (:func:`batched`)."""
    cfg = job.config
    ids = token_ids(ids, cfg.vocab_size, f"'{job.calib}'")
    if ids.shape[1] > cfg.max_position_embeddings:
        raise UserError(f"sequence length {ids.shape[1]} exceeds the model's max_position_embeddings "
                        f"{cfg.max_position_embeddings}: lower --seq-len")
    from mone_jax.calib.calibration import calibration_batches  # JAX: only once data is read

    return calibration_batches(ids, job.batch_size)


def batches_shape(batches) -> tuple[int, int]:
    """(sequences, tokens per sequence) that calibration batches hold, padding rows not counted."""
    rows = sum(int(np.asarray(b["attention_mask"]).any(1).sum()) if isinstance(b, dict) else b.shape[0]
               for b in batches)
    first = batches[0]["input_ids"] if isinstance(batches[0], dict) else batches[0]
    return rows, int(first.shape[1])


def calibrate_job(args: argparse.Namespace) -> CalibJob:
    """``mone-jax calibrate``."""
    if args.calib is None:
        raise UserError(CALIB_HELP)
    file_out(args.stats_out)
    return calib_job(args, args.model, checked_config(args.model), args.calib)


def prune_job(args: argparse.Namespace) -> PruneJob:
    """``mone-jax prune``: with no model, the shipped demo model with demo defaults."""
    model, calib, out, ratio = args.model, args.calib, args.out, args.ratio
    num_samples, seq_len = args.num_samples, args.seq_len
    if model is None:
        from mone_jax.demo import demo_model_dir

        model, out = str(demo_model_dir()), out or "mone-demo-out"
        calib = calib or (None if args.stats or _weights_drop(args) else "self")
        if args.keep is None and ratio is None and not args.plan:
            ratio = 0.25
        if calib == "self":  # 16 sampled sequences of 64 tokens: a first run in seconds
            num_samples, seq_len = num_samples or 16, seq_len or 64
    problems = Problems()
    cfg = None
    with problems.check():  # the folder first
        cfg = checked_config(model)
    with problems.check():
        if out is not None:
            _check_out(Path(out), model, args)
    fmt = _prune_option_problems(args, problems, calib, ratio, out)
    if cfg is not None and fmt is not None:
        with problems.check():
            check_quantized_export(model, fmt.name, args.out_dtype)
    problems.raise_any()
    semantics = check_semantics(getattr(args, "semantics", "exact"))
    scopes, fits = names(args.scope), tuple(None if f == NO_FIT else f for f in names(getattr(args, "fit", None)))
    fit = fits[0] if len(fits) == 1 else None
    stats = plan = None
    keep = 0
    if args.stats:
        stats = Stats.load(args.stats)
        stats.check_matches(cfg.model_type, cfg.num_experts, cfg.moe_layer_ids, cfg.hidden_size)
        if "weighted" in fits and (lack := {"wsq_sum", "wsq_out_sum"} & stats.missing):
            raise UserError(f"--fit weighted needs the statistics {', '.join(sorted(lack))}, which '{args.stats}' "
                            "lacks (written by an older version): recalibrate")
    if args.plan:
        plan = Plan.load(args.plan).validate(cfg, fmt.mode)
    else:
        keep = resolve_keep(cfg.num_experts, args.keep, ratio)
        if fmt.mode == "drop":
            check_drop_keep(cfg, keep)
    calib_part = None if stats is not None or _weights_drop(args) else calib_job(
        args, model, cfg, calib, num_samples=num_samples, seq_len=seq_len)
    return PruneJob(model, cfg, args.dtype, calib_part, stats, plan, keep, args.metric,
                    scopes[0] if len(scopes) == 1 else ",".join(scopes), args.seed, fmt, Path(out), args.stats_out,
                    args.plan_out, args.out_dtype, args.overwrite, None if args.plan else ratio, semantics, fit,
                    tuple(scopes), fits or (None,))


def names(text: str | None) -> list[str]:
    """A comma-separated option's values (none for None)."""
    return [] if text is None else [x.strip() for x in text.split(",") if x.strip()]


def _check_greedy(args: argparse.Namespace, semantics: str) -> None:
    """Refuse what ``--scope greedy`` cannot do, before any work."""
    from mone_jax.evaluate.greedy import parse_candidates

    parse_candidates(args.candidates)
    if args.plan:
        raise UserError("--plan fixes the kept experts: drop --scope greedy")
    if semantics != "exact":
        raise UserError("--scope greedy judges its candidates under exact semantics: drop --semantics")
    if export_format(args.format).mode == "drop":
        raise UserError("--scope greedy judges experts replaced by their novices, which a drop export does not hold "
                        "(it removes the experts' router columns and renormalises the routing): use --format "
                        "substitution or modepd, or --scope layer for drop")


def _prune_option_problems(args: argparse.Namespace, problems: Problems, calib: str | None, ratio: float | None,
                           out: str | None) -> ExportFormat | None:
    """Note every problem of ``prune``'s options in ``problems``; the export format when it is known."""
    fmt = None
    with problems.check():
        fmt = export_format(args.format)
    with problems.check():
        if args.metric != "auto":
            known_metric(args.metric)
        elif args.plan:
            raise UserError("--plan fixes the kept experts: drop --metric auto")
        semantics = check_semantics(getattr(args, "semantics", "exact"))
        if args.metric == "auto" and semantics != "exact":
            raise UserError("--metric auto judges its candidates under exact semantics: name a metric with "
                            "--semantics reference, or drop --semantics")
    scopes, fits = names(args.scope), names(getattr(args, "fit", None))
    if (len(scopes) > 1 or len(fits) > 1) and args.metric != "auto":
        problems.add("several scopes or fits are candidates of --metric auto: give one --scope and one --fit, or "
                     "--metric auto")
    if bad := [s for s in scopes if s not in (*SCOPES, GREEDY)] or not scopes:
        problems.add(f"unknown scope '{(bad or [''])[0]}': use one of {', '.join((*SCOPES, GREEDY))} (several, "
                     "comma-separated, with --metric auto)")
    elif GREEDY in scopes:
        with problems.check():
            _check_greedy(args, check_semantics(getattr(args, "semantics", "exact")))
    if bad := [f for f in fits if f not in (NO_FIT, *FITS)]:
        problems.add(f"unknown fit '{bad[0]}': use one of {', '.join((NO_FIT, *FITS))}")
    fit = ",".join(f for f in fits if f != NO_FIT)
    if fit and fmt is not None and fmt.mode == "drop":
        problems.add(f"--fit {fit} fits novices, which a {fmt.name} export does not hold: drop --fit or use "
                     "--format substitution or modepd")
    if fit and getattr(args, "semantics", "exact") != "exact":
        problems.add(f"--fit {fit} fits exact statistics: drop --semantics")
    if args.plan and (args.keep is not None or ratio is not None):
        problems.add("--plan fixes the kept experts: drop --keep / --ratio")
    if args.keep is None and ratio is None and not args.plan:
        problems.add("give the experts kept per layer with --keep N or the fraction pruned with --ratio R")
    if fmt is not None and fmt.mode == "drop" and "model" in scopes and not args.plan:
        problems.add("--format drop needs the same number of experts in every layer, which --scope model does not "
                     "give: use --scope layer or --format substitution")
    if args.stats and calib:
        problems.add("--stats reuses computed statistics: drop --calib")
    weights_drop = fmt is not None and (args.metric == "auto" or args.metric in METRICS) and _weights_drop(args)
    if weights_drop and (calib or args.stats or args.stats_out):
        problems.add(f"--metric {args.metric} --format {args.format} needs no calibration: drop --calib / --stats / "
                     "--stats-out")
    elif not weights_drop and calib is None and not args.stats:
        problems.add(CALIB_HELP)
    if out is None:
        problems.add("give the output folder with --out")
    for path in (args.stats_out, args.plan_out):
        with problems.check():
            file_out(path)
    return fmt


def _weights_drop(args: argparse.Namespace) -> bool:
    """A prune that needs no statistics: a weights-only metric (aimer) exported with experts dropped."""
    return (not args.plan and args.metric != "auto" and metric(args.metric).needs_weights
            and export_format(args.format).mode == "drop")


def _check_out(out: Path, model: str, args: argparse.Namespace) -> None:
    """Refuse, before any work, an --out that the export could not or should not replace."""
    src = Path(model).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file: give a folder")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"output folder '{out}' exists and is not empty: choose another --out or pass --overwrite")
    if out.resolve() == src or out.resolve() in src.parents:
        raise UserError(f"--out '{out}' would replace the model folder '{model}': choose another --out")
    for f in (args.stats_out, args.plan_out):
        if f and out.resolve() in Path(f).resolve().parents:
            raise UserError(f"'{f}' lies inside --out '{out}', which the export replaces: write it elsewhere")
