"""The calibration run of ``calibrate``, ``prune`` and ``compare``: the model's device mesh (``--mesh``), the
model loaded onto it or streamed layer by layer (``--sequential``), resumable checkpoints."""

from __future__ import annotations

import json

from mone_jax.base.phases import phase


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


def mesh_text(mesh) -> str:
    """``data=D,expert=X``: a mesh as ``--mesh`` writes it."""
    return ",".join(f"{k}={v}" for k, v in mesh.shape.items())


def batch_text(job) -> str:
    """How a calibration job's batch size was set: ``8 (--batch-size)`` or ``8 (chosen for this machine)``."""
    return f"{job.batch_size} ({'--batch-size' if job.batch_given else 'chosen for this machine'})"


def finish(job) -> None:
    """After the outputs of a finished run are written: its resumable checkpoint is no longer needed."""
    from mone_jax.calib.resume import remove_checkpoint

    if job.scale.checkpoint_dir:
        remove_checkpoint(job.scale.checkpoint_dir, job.scale.offload_dir)


def run_calibration(job, model=None, mesh=None):
    """Statistics of a :class:`~mone_jax.app.jobs.CalibJob`: the model loaded layer by layer onto the mesh
    (``mesh``, default :func:`model_mesh`), or streamed with --sequential; an already loaded ``model`` is used
    as it is."""
    from mone_jax.app.data import META_KEY as DATA_KEY
    from mone_jax.app.hub import origin
    from mone_jax.app.jobs import read_batches
    from mone_jax.app.mix import META_KEY as MIX_KEY
    from mone_jax.app.sequential import calibrate_sequential
    from mone_jax.calib.calibration import calibrate, identity
    from mone_jax.calib.resume import CalibCheckpoint
    from mone_jax.convert.load import load_hf, refuse_pruned

    opts, cfg = job.scale, job.config
    mesh = mesh or model_mesh(cfg, job.dtype, opts.mesh, sequential=opts.sequential)
    if model is None and not opts.sequential:
        refuse_pruned(job.model)
        phase("load", f"the model in '{job.model}' ({cfg.num_layers} layers, {job.dtype}) onto a "
                      f"{mesh_text(mesh)} mesh; batch size {batch_text(job)}")
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
            phase("calibrate", f"streaming {cfg.num_layers} layers from '{job.model}' over {len(batches)} "
                               f"batch{'es' if len(batches) != 1 else ''} ({mesh_text(mesh)} mesh; batch size "
                               f"{batch_text(job)})")
            stats = calibrate_sequential(job.model, batches, dtype=job.dtype, mesh=mesh,
                                         offload_dir=opts.offload_dir, progress=job.progress, checkpoint=ckpt)
        else:
            stats = calibrate(model, batches, mesh=mesh, progress=job.progress, checkpoint=ckpt)
        stats.meta["semantics"] = job.semantics  # recorded in the statistics file
        if hub := origin(job.model):  # a hub model: its id and the commit calibrated
            stats.meta.update(source_model=hub["repo"], source_revision=hub["revision"])
        if job.mix:  # the statistics record the calibration mix (mone_jax.app.mix)
            stats.meta[MIX_KEY] = json.dumps(list(job.mix))
        if job.data:  # and the tokens per document of one text source (mone_jax.app.data.token_blocks)
            stats.meta[DATA_KEY] = json.dumps(job.data)
        return stats
    finally:
        if ckpt is not None:
            ckpt.close()
