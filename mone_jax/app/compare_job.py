"""Application side of ``mone-jax compare`` and ``--metric auto``: validation sources parsed and read,
a validation split carved from the calibration blocks, the model loaded once and calibrated once."""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import replace

import numpy as np

from mone_jax.app.jobs import CalibJob, calib_job, checked_config, read_batches
from mone_jax.base.errors import UserError
from mone_jax.base.phases import phase, silenced
from mone_jax.base.stats import Stats
from mone_jax.evaluate.compare import candidates, compare, select
from mone_jax.pruning.planning import DISTILLED, GREEDY, check_drop_keep, resolve_keep
from mone_jax.pruning.scoring import METRICS, metric

_NAMED = re.compile(r"([A-Za-z_][\w.-]*)=(.+)")


def parse_sources(spec: str) -> dict[str, str]:
    """``--valid``: ``SPEC`` (one source named "valid") or ``NAME=SPEC,NAME=SPEC,...``."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise UserError("--valid is empty: give a validation file, folder, .npy or hf:NAME")
    if len(parts) == 1 and not _NAMED.fullmatch(parts[0]):
        return {"valid": parts[0]}
    out: dict[str, str] = {}
    for p in parts:
        m = _NAMED.fullmatch(p)
        if not m:
            raise UserError(f"--valid part '{p}' has no name: write several sources as NAME=SPEC,NAME=SPEC")
        if m[1] in out or m[1] == "all":
            raise UserError(f"--valid names '{m[1]}' twice or uses the reserved name 'all': give unique names")
        if m[2] == "self":
            raise UserError("validate on held-out data (a file, folder, .npy or hf:NAME), not on the model's own "
                            "samples")
        out[m[1]] = m[2]
    return out


def read_sources(sources: dict[str, str], model: str, vocab: int, num_samples: int, seq_len: int,
                 text_field: str = "text") -> dict[str, np.ndarray]:
    """Consecutive token blocks from the start of each source (as ``mone-jax eval`` reads them)."""
    from mone_jax.app.data import load_token_blocks

    if "self" in sources.values():
        raise UserError("validate on held-out data (a file, folder, .npy or hf:NAME), not on the model's own samples")
    return {name: load_token_blocks(spec, tokenizer_dir=model, num_samples=num_samples, seq_len=seq_len,
                                    text_field=text_field, vocab_size=vocab, contiguous=True)
            for name, spec in sources.items()}


def carve(batches: tuple[np.ndarray, ...], fraction: float, seed: int,
          batch_size: int) -> tuple[tuple[np.ndarray, ...], np.ndarray, list[int]]:
    """Split calibration blocks into (calibration batches, validation blocks, indices of the held-out blocks):
    round(fraction x blocks) seeded random blocks (at least one) are held out. The blocks are non-overlapping
    windows of one token stream, so the two parts share no token position."""
    if not 0 < fraction < 1:
        raise UserError(f"--valid-fraction must lie in (0, 1), got {fraction}")
    blocks = np.concatenate(batches)
    n = blocks.shape[0]
    held = max(1, int(round(fraction * n)))
    if held >= n:
        raise UserError(f"--valid-fraction {fraction} of {n} calibration blocks leaves none to calibrate on: "
                        "raise --num-samples or lower --valid-fraction")
    order = np.random.default_rng(seed).permutation(n)
    valid, calib = np.sort(order[:held]), np.sort(order[held:])
    rest = blocks[calib]
    return tuple(rest[i:i + batch_size] for i in range(0, len(rest), batch_size)), blocks[valid], valid.tolist()


def block_len(job: CalibJob) -> int:
    """Tokens per calibration block (a raw .npy's rows as they are), the length validation blocks get."""
    return int(job.batches[0].shape[1]) if job.batches else job.seq_len


def load_and_calibrate(job: CalibJob):
    """(model, statistics, seconds to load, seconds to calibrate, the calibration batches) of a calibration job: the
    model is loaded once and kept for evaluation."""
    from mone_jax.app.pipeline import run_calibration
    from mone_jax.convert.load import load_hf, refuse_pruned

    if job.scale.sequential:
        raise UserError("comparing or choosing plans evaluates pruned models in memory: drop --sequential")
    refuse_pruned(job.model)
    t0 = time.perf_counter()
    model = load_hf(job.model, job.dtype, progress=job.progress)
    t1 = time.perf_counter()
    if job.batches is None:  # --calib self: sampled from the loaded model
        from mone_jax.model.sampling import sampler_for

        job = replace(job, batches=read_batches(job, sampler_for(model)))
    stats = run_calibration(job, model=model)
    return model, stats, t1 - t0, time.perf_counter() - t1, job.batches


def weight_scores(folder: str, metrics, progress: bool = True) -> dict[str, dict[int, np.ndarray]]:
    """Scores of the weights-only metrics among ``metrics`` (default: the registry), streamed from the checkpoint."""
    from mone_jax.convert.criteria import weight_scores as scores

    return {m: scores(folder, m, progress=progress) for m in (METRICS if metrics is None else metrics)
            if metric(m).needs_weights}


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{what} takes comma-separated numbers, got '{text}'") from None


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{what} takes comma-separated integers, got '{text}'") from None


def run_compare(args: argparse.Namespace) -> dict:
    """``mone-jax compare``: every check before the model loads, one calibration, every plan, the report."""
    from mone_jax.app.hub import origin
    from mone_jax.evaluate import report

    t_start = time.perf_counter()
    if args.calib is None:
        raise UserError("give calibration data with --calib (token ids .npy, text files, hf:NAME, or self)")
    metrics = None if args.metrics is None else [m.strip() for m in args.metrics.split(",") if m.strip()]
    ratios, seeds = _floats(args.ratios, "ratios"), _ints(args.seeds, "seeds")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    scopes, fits = (None if v is None else [x.strip() for x in v.split(",") if x.strip()]
                    for v in (args.scopes, args.fits))
    cands = candidates(metrics, ratios, modes, seeds, scopes, fits)
    from mone_jax.evaluate.greedy import parse_candidates

    greedy_candidates = parse_candidates(args.candidates)
    cfg = checked_config(args.model)
    for r in ratios:
        keep = resolve_keep(cfg.num_experts, None, r)
        if "drop" in modes:
            check_drop_keep(cfg, keep)
    sources = parse_sources(args.valid)
    job = calib_job(args, args.model, cfg, args.calib)
    t_data = time.perf_counter()
    evals = read_sources(sources, args.model, cfg.vocab_size, args.valid_samples, block_len(job), args.text_field)
    data_s = time.perf_counter() - t_data
    model, stats, load_s, calib_s, batches = load_and_calibrate(job)
    t_scores = time.perf_counter()
    scores = weight_scores(args.model, {c.metric for c in cands}, args.progress)
    calib_s += time.perf_counter() - t_scores  # the weights-only metrics' "calibration"
    result = compare(model, stats, evals, cands, scope=args.scope, batch_size=args.batch_size or 8,
                     weight_scores=scores, progress=args.progress, train=train_blocks(batches),
                     greedy_candidates=greedy_candidates, lazy=args.search == "lazy")
    hub = origin(args.model)  # a hub model: its id and commit rather than the cache folder
    result.update(model=hub["repo"] if hub else args.model, **({"model_revision": hub["revision"]} if hub else {}),
                  calib=args.calib, calib_tokens=stats.tokens, valid=sources, seeds=seeds, candidates=len(cands))
    result["timing"] = timing(result, load_s, data_s + (t_data - t_start), calib_s, time.perf_counter() - t_start)
    paths = report.write(result, args.out)
    result["timing"]["total_with_report"] = time.perf_counter() - t_start
    return {**result, "written": paths}


def timing(result: dict, load_s: float, data_s: float, calib_s: float, total_s: float) -> dict:
    """Where the wall time went, and wall / (calibration + one evaluation per plan + compilation + greedy searches
    and fits)."""
    plans = result["plans"]
    compile_s = result["original_compile_seconds"] + sum(p["compile_seconds"] for p in plans)
    costly = [p for p in plans if "search" in p or "steps" in p.get("fitted", {})]  # counted as they ran
    cheap = [p for p in plans if p not in costly]
    forward = float(np.median([p["seconds"] - p["compile_seconds"] for p in cheap or plans]))
    shapes = len({(p["mode"], *(len(k) for k in p["kept"].values())) for p in plans})
    extra = sum(p["seconds"] for p in costly)
    expected = (calib_s + forward * (len(cheap) + 1) + result["original_compile_seconds"]
                + sum(p["compile_seconds"] for p in cheap) + extra)
    return {"load": load_s, "data": data_s, "calibration": calib_s, "compile": compile_s, "shapes": shapes,
            "compiles": result.get("compiles", shapes + 1), "forward_per_plan": forward, "total": total_s,
            "expected": expected, "ratio": total_s / expected, **({"searches_and_fits": extra} if costly else {})}


def describe_selection(selection: dict) -> str:
    """One line on a ``--metric auto`` choice: the chosen metric (or candidate, over scopes and fits) and every
    candidate's validation loss."""
    if "tried" in selection:
        losses = ", ".join(f"{t['candidate']} {t['nll']:.4f} ({t['seconds']:.0f} s)" for t in selection["tried"])
        return f"chose '{selection['chosen_candidate']}' (lowest validation loss; mean token NLL: {losses})"
    losses = ", ".join(f"{m} {c['nll']:.4f}" for m, c in selection["candidates"].items())
    return f"chose metric '{selection['chosen']}' (lowest validation loss; mean token NLL: {losses})"


def selection_summary(selection: dict) -> dict:
    """The choice of ``--metric auto`` for the JSON that ``prune`` prints: chosen metric, each candidate's loss
    (over scopes and fits: every candidate tried, its loss and seconds)."""
    tried = {"chosen_candidate": selection["chosen_candidate"], "tried": selection["tried"]} if "tried" in selection \
        else {}
    return {"chosen": selection["chosen"], "criterion": selection["criterion"],
            "validation_nll": {m: c["nll"] for m, c in selection["candidates"].items()}, **tried}


def describe_search(search: dict) -> str:
    """One line on a ``--scope greedy`` search: evaluations, time, per-layer counts, validation loss."""
    counts = "/".join(str(n) for n in search["kept_per_layer"].values())
    return (f"greedy search: {search['evaluations']} evaluations in {search['seconds']:.0f} s; kept {counts} per MoE "
            f"layer; validation loss {search['validation_nll_start']:.4f} -> {search['validation_nll']:.4f}")


def select_for_prune(job, valid: str | None, fraction: float, valid_samples: int, batch_size: int, mesh=None,
                     candidates: str | None = None, lazy: bool = True):
    """``prune --metric auto``, ``--scope greedy`` and / or ``--fit kd``: (statistics, chosen plan, the distilled
    pruned model or None). The model is loaded once;
    the validation blocks are ``--valid`` or carved from the calibration blocks (``--valid-fraction``) before
    calibrating on the rest (on ``mesh``, default :func:`~mone_jax.app.pipeline.model_mesh`). With both, the
    metric is chosen at scope layer, then orders the greedy search's ``candidates`` (``lazy``: CELF)."""
    from mone_jax.convert.load import load_hf

    progress = job.calib.progress if job.calib is not None else True
    evals, held_ids = None, []
    if valid is not None:
        seq_len = block_len(job.calib) if job.calib is not None else 512
        evals = read_sources(parse_sources(valid), job.model, job.config.vocab_size, valid_samples, seq_len)
    if job.calib is None and (kd := set(job.fits) & set(DISTILLED)):
        raise UserError(f"--fit {min(kd)} trains on calibration tokens, which reused statistics lack: give --calib")
    if job.calib is None:  # statistics reused: nothing to carve from
        if evals is None:
            raise UserError("--metric auto with --stats needs validation data disjoint from the calibration: give "
                            "--valid")
        model, stats = load_hf(job.model, job.dtype, progress=progress), job.stats
    else:
        cal = job.calib
        if cal.scale.sequential:
            raise UserError("--metric auto evaluates every candidate in memory: drop --sequential")
        from mone_jax.app.pipeline import batch_text, mesh_text, model_mesh

        mesh = mesh or model_mesh(cal.config, cal.dtype, cal.scale.mesh)
        phase("load", f"the model in '{job.model}' ({job.config.num_layers} layers, {job.dtype}); calibrating on a "
                      f"{mesh_text(mesh)} mesh, batch size {batch_text(cal)}")
        model = load_hf(job.model, job.dtype, progress=progress)
        if cal.batches is None:  # --calib self: sampled from the loaded model
            from mone_jax.model.sampling import sampler_for

            cal = replace(cal, batches=read_batches(cal, sampler_for(model)))
        if evals is None:
            calib, held, held_ids = carve(cal.batches, fraction, cal.seed, cal.batch_size)
            cal, evals = replace(cal, batches=calib), {"valid": held}
        from mone_jax.app.pipeline import run_calibration

        stats = run_calibration(cal, model=model, mesh=mesh)
    n_group = job.config.n_group if job.format.mode == "drop" else 1
    held_out = {"calib": job.calib.calib, "fraction": fraction, "blocks": held_ids} if valid is None else {"valid": valid}
    greedy = job.scope == GREEDY
    scores = weight_scores(job.model, None if job.metric == "auto" else [job.metric], progress)
    if len(job.scopes) > 1 or len(job.fits) > 1:  # --metric auto over scopes x fits
        return stats, *choose(model, stats, evals, job, scores, n_group, batch_size, progress, held_out,
                              train_blocks(cal.batches) if set(job.fits) & set(DISTILLED) else None, candidates, lazy, mesh)
    plan = None
    if job.metric == "auto":
        plan = select(model, stats, evals, keep=job.keep, mode=job.format.mode, scope="layer" if greedy else job.scope,
                      seed=job.seed, n_group=n_group, weight_scores=scores, batch_size=batch_size, progress=progress)
        plan.selection["held_out"] = held_out
    if greedy:
        plan = _greedy(model, stats, evals, job, plan.metric if plan else job.metric, plan.selection if plan else None,
                       scores, batch_size, progress, held_out, candidates, lazy, mesh, fit=job.fit)
    if plan is None:  # --fit kd alone: the plan of the metric
        from mone_jax.convert.criteria import plan_for

        plan = job.plan or plan_for(job.metric, stats=stats, model=job.model, keep=job.keep, scope=job.scope,
                                    seed=job.seed, semantics=job.semantics, progress=progress)
    student = None
    if job.fit in DISTILLED:
        plan, student = distilled(model, stats, plan, train_blocks(cal.batches), evals, batch_size, job.seed,
                                  progress, mesh=mesh, method=job.fit)
    elif job.fit:
        plan = fitted(model, stats, plan, job.fit, evals, batch_size)
    return stats, plan, student


def _tried(metric: str, scope: str, fit: str | None, nll: float, seconds: float) -> dict:
    return {"candidate": metric + f" {scope}" + (f" + {fit}" if fit else ""), "metric": metric, "scope": scope,
            "fit": fit, "nll": nll, "seconds": seconds}


def choose(model, stats: Stats, evals: dict[str, np.ndarray], job, scores, n_group: int, batch_size: int,
           progress: bool, held_out: dict, train: np.ndarray | None, candidates: str | None, lazy: bool, mesh=None):
    """``prune --metric auto`` over lists of scopes and fits: (plan, distilled model or None) of the candidate with
    the lowest validation loss. Every metric is a candidate at each fixed scope; the greedy scope searches once,
    ordered by the metric chosen at scope layer; each fit is tried on the best plan of each scope (a fit costs a
    fit per plan, a greedy search one per metric: the count is said up front). The plan's ``selection`` records
    every candidate's validation loss and seconds (``tried``) and the winner."""
    from mone_jax.evaluate.compare import select
    from mone_jax.pruning.transform import prune

    fixed = [s for s in job.scopes if s != GREEDY]
    fits = [f for f in job.fits if f]
    plain = None in job.fits
    n = len(METRICS) * len(fixed) * plain + (GREEDY in job.scopes) * plain + len(fits) * len(job.scopes)
    what = [f"{len(METRICS)} metrics at scope {s}" for s in fixed] * plain
    what += [f"greedy ({candidates or 'all'} per layer, {'lazy' if lazy else 'exhaustive'})"] * (
        GREEDY in job.scopes and plain)
    what += [f"{f} on the best of each scope" for f in fits]
    phase("plan", f"{n} candidates: {', '.join(what)}")
    best, tried = {}, []
    for s in dict.fromkeys([*fixed, *(["layer"] if GREEDY in job.scopes else [])]):
        best[s] = select(model, stats, evals, keep=job.keep, mode=job.format.mode, scope=s, seed=job.seed,
                         n_group=n_group, weight_scores=scores, batch_size=batch_size, progress=progress)
        if s in fixed and plain:
            tried += [_tried(m, s, None, c["nll"], c["seconds"]) for m, c in best[s].selection["candidates"].items()]
    if GREEDY in job.scopes:
        t0 = time.perf_counter()
        layer = best["layer"]
        best[GREEDY] = _greedy(model, stats, evals, job, layer.metric, layer.selection, scores, batch_size, progress,
                               held_out, candidates, lazy, mesh)
        if plain:  # the pruned model judged like every other candidate
            nll = _valid_nll(prune(model, stats, best[GREEDY]), evals, batch_size)
            tried.append(_tried(layer.metric, GREEDY, None, nll, time.perf_counter() - t0))
    plans, students = {}, {}
    for s in job.scopes:
        plans[s, None] = best[s]
        for f in fits:
            t0 = time.perf_counter()
            if f in DISTILLED:
                plans[s, f], students[s, f] = distilled(model, stats, best[s], train, evals, batch_size, job.seed,
                                                        progress, mesh=mesh, method=f)
            else:
                plans[s, f] = fitted(model, stats, best[s], f, evals, batch_size)
            tried.append(_tried(best[s].metric, s, f, plans[s, f].fit["validation_nll_after"],
                                time.perf_counter() - t0))
            phase("plan", f"{tried[-1]['candidate']}: validation loss {tried[-1]['nll']:.4f}")
    win = min((t for t in tried if (t["scope"], t["fit"]) in plans and t["metric"] == plans[t["scope"], t["fit"]].metric),
              key=lambda t: t["nll"])
    plan = plans[win["scope"], win["fit"]]
    selection = {**(plan.selection or best["layer" if "layer" in best else win["scope"]].selection),
                 "held_out": held_out, "scopes": list(job.scopes), "fits": [f or "none" for f in job.fits],
                 "tried": tried, "chosen_candidate": win["candidate"]}
    return replace(plan, selection=selection), students.get((win["scope"], win["fit"]))


def _greedy(model, stats: Stats, evals: dict[str, np.ndarray], job, metric: str, selection: dict | None, scores,
            batch_size: int, progress: bool, held_out: dict, candidates: str | None, lazy: bool, mesh,
            fit: str | None = None):
    """:func:`~mone_jax.evaluate.greedy.greedy_plan` ordered by ``metric``, its search recording ``held_out``."""
    from mone_jax.evaluate.greedy import greedy_plan, parse_candidates

    plan = greedy_plan(model, stats, evals, metric=metric, keep=job.keep, candidates=parse_candidates(candidates),
                       lazy=lazy, seed=job.seed, weight_scores=scores, batch_size=batch_size, progress=progress,
                       selection=selection, fit=fit, mesh=mesh)
    plan.search["held_out"] = held_out
    return plan


def train_blocks(batches) -> np.ndarray:
    """The calibration blocks of ``batches`` as one [N, T] array (padding rows dropped): what ``kd`` fits on."""
    return np.concatenate([b if isinstance(b, np.ndarray) else np.asarray(b["input_ids"])[
        np.asarray(b["attention_mask"]).all(1)] for b in batches])


def _valid_nll(model, evals: dict[str, np.ndarray], batch_size: int) -> float:
    from mone_jax.evaluate.greedy import validation_nll

    with silenced():
        return validation_nll(model, evals, batch_size)


def fitted(model, stats: Stats, plan, fit: str, evals: dict[str, np.ndarray], batch_size: int):
    """``plan`` with its novices fitted by ``fit``, recording the validation loss before (plain means) and after."""
    from mone_jax.pruning.transform import prune

    loss = {name: _valid_nll(prune(model, stats, replace(plan, fit=how)), evals, batch_size)
            for name, how in (("validation_nll_before", None), ("validation_nll_after", {"method": fit}))}
    return replace(plan, fit={"method": fit, **loss})


def distilled(model, stats: Stats, plan, train: np.ndarray, evals: dict[str, np.ndarray], batch_size: int, seed: int,
              progress: bool, mesh=None, method: str = "kd"):
    """(``plan`` recording the fit, the pruned model distilled from ``model``): :func:`~mone_jax.evaluate.distill.
    distill` (``method``: what it fits) on the calibration blocks ``train`` (rows split over ``mesh``), stopping
    early on the validation blocks."""
    from mone_jax.evaluate.distill import distill
    from mone_jax.pruning.transform import prune

    student = prune(model, stats, plan)
    before = _valid_nll(student, evals, batch_size)
    phase("fit", f"distilling {DISTILLED[method]} on {len(train)} calibration blocks (--fit {method})")
    with silenced():
        record = distill(model, student, train, np.concatenate(list(evals.values())), batch_size=batch_size,
                         seed=seed, progress=progress, mesh=mesh, method=method)
    record.update(validation_nll_before=before, validation_nll_after=_valid_nll(student, evals, batch_size))
    return replace(plan, fit=record), student


def select_for_plan(args: argparse.Namespace):
    """``plan MODEL_DIR --stats FILE --metric auto --valid DATA``: the chosen plan (the statistics are given, so the
    validation data must be given too)."""
    from mone_jax.convert.formats import export_format
    from mone_jax.convert.load import load_hf

    model_dir = args.stats_file
    if args.stats is None or model_dir is None or args.valid is None:
        raise UserError("plan --metric auto scores every candidate's pruned model: give the model folder, --stats "
                        "(its statistics) and --valid (validation data disjoint from the calibration)")
    stats = Stats.load(args.stats)
    cfg = checked_config(model_dir)
    stats.check_matches(cfg.model_type, cfg.num_experts, cfg.moe_layer_ids, cfg.hidden_size)
    mode = export_format(args.format).mode
    keep = resolve_keep(cfg.num_experts, args.keep, args.ratio)
    if mode == "drop":
        check_drop_keep(cfg, keep)
    evals = read_sources(parse_sources(args.valid), model_dir, cfg.vocab_size, args.valid_samples, args.seq_len)
    model = load_hf(model_dir, args.dtype, progress=args.progress)
    return select(model, stats, evals, keep=keep, mode=mode, scope=args.scope, seed=args.seed,
                  n_group=cfg.n_group if mode == "drop" else 1,
                  weight_scores=weight_scores(model_dir, None, args.progress), batch_size=args.batch_size,
                  progress=args.progress)
