"""The environment the benchmarks give the processes they time: the caller's, on one CPU device.

A ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` (the test suite's 8 devices, a sharding
experiment's) is removed, so a child sees one CPU device as a user's process does; every other flag the caller
set is kept (the benchmarks set none themselves)."""

from __future__ import annotations

import os
import re


def child_env(drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """``os.environ`` without the device-count flag and the variables ``drop``, with ``extra`` set."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.pop("XLA_FLAGS", "")).split()
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    return {**env, **extra}
