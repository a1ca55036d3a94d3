"""Device mesh, partition rules and batch layout of the sharded calibration step.

The mesh has two axes: ``data`` and ``expert``. Batch rows are split over both (every device runs
attention and dense layers on its own rows, none twice). The routed-expert arrays (the
:class:`~mone_jax.model.layers.ExpertParam` / :class:`~mone_jax.model.layers.ExpertBuffer` variables) are
split over ``expert``, every other parameter is replicated. The calibration steps run the model
in one ``shard_map``; inside each MoE block (:func:`~mone_jax.model.moe.expert_parallel_dispatch`) an
``expert`` group gathers its rows, each device runs its own experts, the outputs are reduce-scattered back
and the statistics merged over ``data``. An expert count that the expert axis does not divide is
padded (:func:`padded_state`) with inert rows that no token reaches.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mone_jax.base.errors import UserError
from mone_jax.model.layers import ExpertBuffer, ExpertParam
from mone_jax.model.moe import DATA, EXPERT

AXES = (DATA, EXPERT)
DEVICE_FILL = 0.7  # auto mesh: the share of a device's memory the parameters may take


def parse_mesh(spec: str | None) -> dict[str, int]:
    """``"data=D,expert=X"`` (either part may be left out) -> {axis: size}; ``"auto"``/None -> {}."""
    if spec is None or spec.strip() in ("", "auto"):
        return {}
    out: dict[str, int] = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in AXES or name in out or not value.strip().isdigit() or int(value) < 1:
            raise UserError(f"bad --mesh '{spec}': write data=D,expert=X with positive integers (or 'auto')")
        out[name] = int(value)
    return out


def mesh_shape(spec: str | None, num_devices: int, num_experts: int, *, param_bytes: tuple[int, int] = (0, 0),
               device_bytes: int | None = None) -> tuple[int, int]:
    """(D, X) from ``--mesh`` with D * X = num_devices (X need not divide num_experts: the stack is padded).

    ``auto`` picks the smallest X for which the replicated parameters plus a device's share of the
    (padded) expert parameters (``param_bytes`` = (replicated, expert)) take at most DEVICE_FILL of
    ``device_bytes``; without a known device memory (CPU) it is pure data parallelism, X = 1.
    """
    axes = parse_mesh(spec)
    if not axes:
        X = 1
        if device_bytes:
            rep, ex = param_bytes
            fits = [x for x in range(1, num_devices + 1) if num_devices % x == 0
                    and rep + ex * -(-num_experts // x) / num_experts <= DEVICE_FILL * device_bytes]
            if not fits:
                raise UserError(f"the model ({(rep + ex) / 2**30:.1f} GiB) does not fit {num_devices} devices of "
                                f"{device_bytes / 2**30:.1f} GiB even with experts split over all of them: "
                                "use more devices or --sequential")
            X = fits[0]
        return num_devices // X, X
    D, X = axes.get("data"), axes.get("expert")
    for name, size, other in (("data", D, X), ("expert", X, D)):
        if size is None and num_devices % other:
            raise UserError(f"--mesh {name} size cannot be derived: {other} does not divide the {num_devices} devices")
    D = D or num_devices // X
    X = X or num_devices // D
    if D * X != num_devices:
        raise UserError(f"--mesh data={D},expert={X} needs {D * X} devices but {num_devices} are present: "
                        "make data * expert equal the device count")
    return D, X


def make_mesh(shape: tuple[int, int], devices=None) -> Mesh:
    """A (data, expert) mesh over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def single_device_mesh() -> Mesh:
    return make_mesh((1, 1), [jax.devices()[0]])


def is_expert(v) -> bool:
    return isinstance(v, (ExpertParam, ExpertBuffer))


def _variables(fn, state):
    return jax.tree.map(fn, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def param_specs(state: nnx.State):
    """PartitionSpecs for ``state``: expert-row variables over ``expert``, the rest replicated."""
    return _variables(lambda v: v.replace(P(EXPERT) if is_expert(v) else P()), state)


def unpadded_specs(state: nnx.State, mesh: Mesh):
    """PartitionSpecs that lay ``state`` out on ``mesh`` without padding it: expert-row variables split over
    ``expert`` where that axis divides their rows, everything else replicated (for programs partitioned by
    jit, which then split the batch rows and reduce over them)."""
    X = mesh.shape[EXPERT]
    return _variables(lambda v: v.replace(P(EXPERT) if is_expert(v) and v.get_value().shape[0] % X == 0 else P()),
                      state)


def spread(model: nnx.Module, mesh: Mesh) -> None:
    """Lay ``model``'s arrays out on ``mesh`` in place (:func:`unpadded_specs`; arrays already so stay)."""
    state = nnx.state(model)
    nnx.update(model, place(state, unpadded_specs(state, mesh), mesh))


def padded_state(state: nnx.State, mesh: Mesh) -> nnx.State:
    """``state`` with every expert-row variable padded by zero rows to a multiple of the expert axis."""
    X = mesh.shape[EXPERT]

    def pad(v):
        a = v.get_value()
        if not is_expert(v) or a.shape[0] % X == 0:
            return v
        return v.replace(jnp.pad(a, [(0, -a.shape[0] % X)] + [(0, 0)] * (a.ndim - 1)))

    return _variables(pad, state)


def param_bytes(module: nnx.Module) -> tuple[int, int]:
    """(replicated, expert-split) parameter bytes of ``module``."""
    _, state = nnx.split(module)
    specs = param_specs(state)
    sizes = [(s == P("expert"), math.prod(a.shape) * jnp.dtype(a.dtype).itemsize)
             for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))]
    return sum(n for e, n in sizes if not e), sum(n for e, n in sizes if e)


def place(tree, specs, mesh: Mesh):
    """Global arrays of ``tree`` laid out by ``specs`` on ``mesh``.

    Arrays already laid out so are kept (:func:`~mone_jax.convert.load.load_hf` builds a checkpoint's arrays
    on the mesh shard by shard from lazy reads: they arrive here placed). Otherwise, with one process,
    ``jax.device_put``; with several, each process builds its own devices' shards, each copied from the
    slice of ``a`` it needs (never a whole host copy of a device array).
    """

    def put(a, spec):
        sharding = NamedSharding(mesh, spec)
        if isinstance(a, jax.Array) and a.sharding.is_equivalent_to(sharding, a.ndim):
            return a
        if jax.process_count() == 1:
            return jax.device_put(a, sharding)
        src = a if isinstance(a, (jax.Array, np.ndarray)) else np.asarray(a)
        return jax.make_array_from_callback(src.shape, sharding, lambda idx: np.asarray(src[idx]))

    return jax.tree.map(put, tree, specs)


def batch_spec(mesh: Mesh) -> P:
    """Rows split over every device (``data`` major, ``expert`` minor); one device: unsplit."""
    return P(AXES) if mesh.size > 1 else P()


def padded_rows(rows: int, mesh: Mesh) -> int:
    """``rows`` rounded up to a multiple of the device count."""
    return -(-rows // mesh.size) * mesh.size


def process_rows(mesh: Mesh, rows: int) -> tuple[int, int]:
    """[lo, hi) of a ``rows``-row batch (already padded) that this process's devices hold."""
    idx = NamedSharding(mesh, batch_spec(mesh)).addressable_devices_indices_map((rows,))
    spans = sorted({s[0].indices(rows)[:2] for s in idx.values()})
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise UserError(f"this process's devices hold non-adjacent batch rows {spans} on the mesh "
                        f"{dict(mesh.shape)}: choose another --mesh")
    return spans[0][0], spans[-1][1]


def global_batch(local: np.ndarray, mesh: Mesh, rows: int) -> jax.Array:
    """A global [rows, ...] array split by :func:`batch_spec` from this process's rows ``local``."""
    sharding = NamedSharding(mesh, batch_spec(mesh))
    return jax.make_array_from_process_local_data(sharding, local, (rows, *local.shape[1:]))


def local_rows(x: jax.Array, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of a global array split by :func:`batch_spec` (this process's rows), on the host."""
    out = np.empty((hi - lo, *x.shape[1:]), x.dtype)
    for shard in x.addressable_shards:
        a, b, _ = shard.index[0].indices(x.shape[0])
        out[a - lo:b - lo] = np.asarray(shard.data)
    return out


def gather_json(obj) -> list:
    """Every process's JSON-able ``obj``, in process order, on every process (a collective: all call it)."""
    import json

    from jax.experimental import multihost_utils

    mine = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([mine.size], np.int32))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:mine.size] = mine
    every = np.asarray(multihost_utils.process_allgather(buf)).astype(np.uint8).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:n])) for row, n in zip(every, sizes)]
