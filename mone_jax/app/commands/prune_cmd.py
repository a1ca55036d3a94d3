"""``mone-jax prune``: calibrate, plan, prune and export in one go."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from mone_jax.base.phases import phase


def run(args) -> None:
    phase("check", f"the options and '{args.model or 'the demo model'}' (importing JAX and transformers)")
    from mone_jax import __version__
    from mone_jax.app.distributed import init_distributed, is_writer
    from mone_jax.app.hub import origin, same_revision
    from mone_jax.app.jobs import prune_job
    from mone_jax.app.pipeline import finish, mesh_text, model_mesh, run_calibration
    from mone_jax.convert.criteria import plan_for
    from mone_jax.convert.export import export_from_stats
    from mone_jax.pruning.card import folder_files
    from mone_jax.pruning.planning import DISTILLED, describe_summary, plan_summary

    job = prune_job(args)
    if job.calib is not None:
        init_distributed(job.calib.scale)
        same_revision(job.model)
    n_group = job.config.n_group if job.format.mode == "drop" else 1  # drop: the same number in every group
    mesh = None if job.calib is None else model_mesh(job.config, job.dtype, job.calib.scale.mesh,
                                                     sequential=job.calib.scale.sequential)
    student = None  # --fit kd / kd-down: the distilled pruned model, exported as it is
    if (job.metric == "auto" or job.scope == "greedy") and job.plan is None or job.fit in DISTILLED:  # uses validation
        from mone_jax.app.compare_job import describe_search, describe_selection, select_for_prune

        if job.metric == "auto" or job.scope == "greedy":
            phase("plan", "choosing the metric with the lowest validation loss (--metric auto)"
                  if job.metric == "auto" else f"searching the experts greedily on validation loss ({job.metric})")
        stats, plan, student = select_for_prune(job, args.valid, args.valid_fraction, args.valid_samples,
                                                args.batch_size or 8, mesh, candidates=args.candidates,
                                                lazy=args.search == "lazy")
        if plan.selection:
            phase("plan", describe_selection(plan.selection))
        if plan.search:
            phase("plan", describe_search(plan.search))
        if plan.fit and "validation_nll_after" in plan.fit:
            phase("fit", f"--fit {plan.fit['method']}: validation loss {plan.fit['validation_nll_before']:.4f} -> "
                         f"{plan.fit['validation_nll_after']:.4f}")
    else:
        stats = job.stats if job.calib is None else run_calibration(job.calib, mesh=mesh)
        phase("plan", f"scoring experts ({job.metric}, scope {job.scope})" if job.plan is None else "the given plan")
        plan = job.plan or plan_for(job.metric, stats=stats, model=job.model, keep=job.keep, scope=job.scope,
                                    seed=job.seed, n_group=n_group, semantics=job.semantics,
                                    progress=args.progress)
        if job.fit:  # no validation data here: the fit alone is recorded
            plan = replace(plan, fit={"method": job.fit})
    if not is_writer():
        return
    if job.stats_out:  # before the export: a failed export does not lose the calibration
        stats.save(job.stats_out)
    if job.plan_out:
        plan.save(job.plan_out)
    kept = plan_summary(plan, job.config.num_experts, job.ratio)
    c = job.calib
    calibration = ({"data": "none (weights-only metric)"} if stats is None else {"data": "reused statistics"}
                   if c is None else {"data": c.calib, "seed": c.seed, **({"mix": list(c.mix)} if c.mix else {}),
                                      **{k: c.data[k] for k in ("documents", "largest_document_tokens")
                                         if c.data and k in c.data}})
    hub = origin(job.model)  # a hub model: its id and commit, not the cache folder
    extra = folder_files(source=hub["repo"] if hub else job.model, out=str(job.out), plan=plan, stats=stats,
                         fmt=job.format, kept=kept, calibration=calibration, version=__version__,
                         source_revision=hub and hub["revision"])
    # streamed from the source checkpoint shard by shard: the pruned model is never assembled in memory
    phase("export", f"writing the {job.format.name} checkpoint to '{job.out}'")
    if student is None:
        summary = export_from_stats(job.model, job.out, stats, plan, fmt=job.format.name, dtype=job.dtype,
                                    out_dtype=job.out_dtype, overwrite=job.overwrite, extra_files=extra)
    else:  # the fitted routers, norms and novices: the arrays the distilled model holds
        from mone_jax.convert.export import export_model

        summary = export_model(student, job.model, job.out, fmt=job.format.name, dtype=job.out_dtype,
                               overwrite=job.overwrite, extra_files=extra)
    if c is not None:
        finish(c)
    if c is not None:  # what the tool chose by itself
        summary.update(batch_size=c.batch_size, batch_size_from="--batch-size" if c.batch_given else "auto",
                       mesh=mesh_text(mesh))
    if hub:  # the commit of a hub model
        summary.update(source_model=hub["repo"], source_revision=hub["revision"])
    if plan.selection:
        from mone_jax.app.compare_job import selection_summary

        summary["metric_selection"] = selection_summary(plan.selection)
    if plan.search:
        summary["search"] = {k: v for k, v in plan.search.items() if k != "steps"}
    if plan.fit:
        summary["fit"] = plan.fit
    print(json.dumps({**summary, "plan": kept}, indent=1))  # stdout: JSON only, for scripts
    if args.quiet:  # errors only on stderr
        return
    print(f"mone-jax: {describe_summary(kept, job.config.num_experts)}; wrote {job.format.name} checkpoint "
          f"{job.out}; next: mone-jax eval {job.out} --data HELD_OUT_TEXT", file=sys.stderr)
