"""Command-line side of scale-out calibration: mesh, multi-host, ``--sequential``, resumable runs."""

from __future__ import annotations

import argparse
import json
import os

from mone_jax.base.errors import UserError
from mone_jax.base.phases import phase


def add_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``calibrate`` and ``prune``."""
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
    g.add_argument("--mesh", default="auto", help="device mesh data=D,expert=X (D*X = devices; X divides the "
                                                  "experts); 'auto': pure data parallel unless the model needs "
                                                  "its experts split to fit device memory")
    return g


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    """The multi-host flags (read by :func:`init_distributed`)."""
    g = p.add_argument_group("multi-host (jax.distributed; every process runs the same command)")
    g.add_argument("--distributed", action="store_true", help="detect the cluster (Cloud TPU pods, SLURM, ...)")
    g.add_argument("--coordinator", default=os.environ.get("MONE_COORDINATOR"),
                   help="HOST:PORT of process 0 (env MONE_COORDINATOR)")
    g.add_argument("--num-processes", type=int, default=os.environ.get("MONE_NUM_PROCESSES"),
                   help="env MONE_NUM_PROCESSES")
    g.add_argument("--process-id", type=int, default=os.environ.get("MONE_PROCESS_ID"), help="env MONE_PROCESS_ID")
    g.add_argument("--heartbeat-timeout", type=int, default=100,
                   help="seconds after which a silent peer fails the run (default 100)")


def init_distributed(args) -> None:
    """``jax.distributed.initialize`` when the options (``--coordinator`` ..., or a
    :class:`~mone_jax.app.jobs.ScaleOptions`) ask for several processes; before any JAX work."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(v is None for v in explicit):
        return
    if not args.distributed and None in explicit:
        raise UserError("multi-host runs need --coordinator, --num-processes and --process-id together "
                        "(or --distributed to detect them on a TPU pod)")
    if args.num_processes is not None and not (args.process_id is not None and 0 <= args.process_id < args.num_processes):
        raise UserError(f"--process-id must lie in [0, {args.num_processes}), got {args.process_id}")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    host = (args.coordinator or "").rsplit(":", 1)[0]
    try:
        jax.distributed.initialize(
            coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
            coordinator_bind_address=args.coordinator if host in ("127.0.0.1", "localhost") else None,
            heartbeat_timeout_seconds=args.heartbeat_timeout,
        )
    except (RuntimeError, ValueError) as e:
        raise UserError(f"jax.distributed could not start ({str(e).splitlines()[0]}): check --coordinator "
                        "and that every process runs with the same --num-processes") from None


def is_writer() -> bool:
    """Process 0 alone writes outputs."""
    import jax

    return jax.process_index() == 0


def _mesh(job):
    return model_mesh(job.config, job.dtype, job.scale.mesh, sequential=job.scale.sequential)


def model_mesh(cfg, dtype, spec: str | None, *, sequential: bool = False):
    """The ``--mesh`` ``spec`` over all devices for a model of config ``cfg``; ``auto`` weighs the model
    against the device memory where known."""
    import jax
    from flax import nnx

    from mone_jax.convert.load import resolve_dtype
    from mone_jax.model.causal_lm import MoEForCausalLM
    from mone_jax.model.sharding import make_mesh, mesh_shape, param_bytes

    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    sizes = (0, 0)
    if limit and not sequential:
        dt = resolve_dtype(dtype)
        sizes = param_bytes(nnx.eval_shape(lambda: MoEForCausalLM(cfg, dt, rngs=nnx.Rngs(0))))
    return make_mesh(mesh_shape(spec, jax.device_count(), cfg.num_experts, param_bytes=sizes,
                                device_bytes=limit))


def finish(job) -> None:
    """After the outputs of a finished run are written: its resumable checkpoint is no longer needed."""
    from mone_jax.calib.resume import remove_checkpoint

    if job.scale.checkpoint_dir:
        remove_checkpoint(job.scale.checkpoint_dir, job.scale.offload_dir)


def run_calibration(job, model=None):
    """Statistics of a :class:`~mone_jax.app.jobs.CalibJob`: the model loaded layer by layer onto the mesh, or
    streamed with --sequential; an already loaded ``model`` is used as it is."""
    from mone_jax.app.jobs import read_batches
    from mone_jax.app.mix import META_KEY as MIX_KEY
    from mone_jax.app.sequential import calibrate_sequential
    from mone_jax.calib.calibration import calibrate, identity
    from mone_jax.calib.resume import CalibCheckpoint
    from mone_jax.convert.load import load_hf, refuse_pruned

    opts, cfg = job.scale, job.config
    mesh = _mesh(job)
    if model is None and not opts.sequential:
        refuse_pruned(job.model)
        phase("load", f"the model in '{job.model}' ({cfg.num_layers} layers, {job.dtype})")
        model = load_hf(job.model, job.dtype, mesh=mesh, progress=job.progress)
    batches = job.batches
    if batches is None:  # sampled from the loaded model
        from mone_jax.model.sampling import sampler_for

        phase("data", f"sampling {job.num_samples} sequences of {job.seq_len} tokens from the model (compiling the "
                      "sampler first)")
        batches = read_batches(job, sampler_for(model))
    ckpt = None
    if opts.checkpoint_dir:
        ckpt = CalibCheckpoint(opts.checkpoint_dir, opts.checkpoint_every,
                               identity(cfg, "sequential" if opts.sequential else "full", job.dtype))
    try:
        if opts.sequential:
            phase("calibrate", f"streaming {cfg.num_layers} layers from '{job.model}' over {len(batches)} batches")
            stats = calibrate_sequential(job.model, batches, dtype=job.dtype, mesh=mesh,
                                         offload_dir=opts.offload_dir, progress=job.progress, checkpoint=ckpt)
        else:
            stats = calibrate(model, batches, mesh=mesh, progress=job.progress, checkpoint=ckpt)
        stats.meta["semantics"] = job.semantics  # recorded in the statistics file
        if job.mix:  # the statistics record the calibration mix (mone_jax.app.mix)
            stats.meta[MIX_KEY] = json.dumps(list(job.mix))
        return stats
    finally:
        if ckpt is not None:
            ckpt.close()
