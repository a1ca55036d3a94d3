"""``mone-jax plan``: score experts and choose the kept ones and the novices."""

from __future__ import annotations

from pathlib import Path

from mone_jax.base.errors import UserError


def run(args) -> None:
    from mone_jax.app.jobs import known_metric
    from mone_jax.base.phases import phase
    from mone_jax.base.stats import Stats
    from mone_jax.convert.criteria import plan_for
    from mone_jax.pruning.planning import describe_summary, plan_summary
    from mone_jax.pruning.scoring import metric

    known_metric(args.metric)
    if args.scope == "greedy":
        raise UserError("--scope greedy searches on the model with its calibration and validation data: use "
                        "`mone-jax prune --scope greedy` (its --plan-out writes the plan)")
    opts = dict(keep=args.keep, ratio=args.ratio, scope=args.scope, seed=args.seed, semantics=args.semantics)
    if args.metric == "auto" and args.semantics != "exact":
        raise UserError("--metric auto judges its candidates under exact semantics: name a metric with "
                        "--semantics reference, or drop --semantics")
    if args.metric == "auto":  # every candidate's pruned model judged on validation data
        from mone_jax.app.compare_job import describe_selection, select_for_plan

        plan = select_for_plan(args)
        phase("plan", describe_selection(plan.selection))
    elif metric(args.metric).needs_weights:  # weights only: the positional argument is the model folder
        model = args.stats_file
        if args.stats is not None or model is None or not Path(model).is_dir():
            raise UserError(f"metric '{args.metric}' scores the weights, not statistics: give the model folder "
                            f"instead of '{args.stats or model}' (mone-jax plan MODEL_DIR --metric {args.metric})")
        plan = plan_for(args.metric, model=model, progress=args.progress, **opts)
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
    how = f"auto: {plan.metric}" if args.metric == "auto" else args.metric
    print(f"plan: {describe_summary(plan_summary(plan, E, args.ratio), E)} ({how}, scope {args.scope}) -> {args.plan_out}")
