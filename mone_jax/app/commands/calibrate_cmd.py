"""``mone-jax calibrate``: per-expert statistics over calibration data."""

from __future__ import annotations

from mone_jax.base.phases import phase


def run(args) -> None:
    phase("check", f"the options and '{args.model}' (importing JAX and transformers)")
    from mone_jax.app.distributed import init_distributed, is_writer
    from mone_jax.app.hub import same_revision
    from mone_jax.app.jobs import batches_shape, calibrate_job
    from mone_jax.app.pipeline import finish, run_calibration

    job = calibrate_job(args)
    init_distributed(job.scale)
    same_revision(job.model)
    stats = run_calibration(job)
    if is_writer():
        stats.save(args.stats_out)
    finish(job)
    shape = "" if job.batches is None else " ({} sequences x {} tokens of '{}')".format(*batches_shape(job.batches),
                                                                                        job.calib)
    print(f"calibrated on {stats.tokens} tokens{shape}; statistics of {len(stats.layers)} MoE layers "
          f"-> {args.stats_out}")
