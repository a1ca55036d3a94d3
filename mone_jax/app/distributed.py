"""Multi-host start-up: ``jax.distributed`` from the command's options, and which process writes outputs."""

from __future__ import annotations

from mone_jax.base.errors import UserError


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
