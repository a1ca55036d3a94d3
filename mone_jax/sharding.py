"""Device mesh, partition rules and the pieces of the sharded calibration step.

The mesh has two axes: ``data`` (batch rows) and ``expert`` (routed experts). The routed-expert
arrays of every MoE block (``gate_up``, ``down``, their biases, ``kept_ids``) are split over
``expert``; every other parameter is replicated (routers, attention and dense layers are small
next to the experts of the models this tool targets).

Inside :func:`jax.shard_map` an expert shard holds E / X expert rows and the matching slice of
``kept_ids`` (their original ids). The MoE block then maps every expert that is not local to the
skip id, so the shard computes only the (token, expert) pairs routed to its own experts; the
partial outputs are summed over ``expert`` (:func:`expert_parallel`). Each shard's statistics
cover its local experts and its local batch rows; :func:`reduce_stats` merges them over ``data``
with an exact collective form of Chan's merge, so a step returns the statistics of the whole
global batch, reduced inside the jitted computation.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mone_jax.errors import UserError
from mone_jax.model import MoEBlock
from mone_jax.moe import ExpertStats, dispatch

AXES = ("data", "expert")
EXPERT_ROWS = ("gate_up", "down", "gate_up_bias", "down_bias", "kept_ids")  # MoEBlock arrays with K rows
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
    """(D, X) from ``--mesh`` with D * X = num_devices and X dividing num_experts.

    ``auto`` picks the smallest X for which the replicated parameters plus 1/X of the expert
    parameters (``param_bytes`` = (replicated, expert)) take at most DEVICE_FILL of
    ``device_bytes``; without a known device memory (CPU) it is pure data parallelism, X = 1.
    """
    axes = parse_mesh(spec)
    if not axes:
        X = 1
        if device_bytes:
            rep, ex = param_bytes
            fits = [x for x in range(1, num_devices + 1) if num_devices % x == 0 and num_experts % x == 0
                    and rep + ex / x <= DEVICE_FILL * device_bytes]
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
    if num_experts % X:
        raise UserError(f"--mesh expert={X} does not divide the model's {num_experts} experts: "
                        "choose an expert axis size that divides it")
    return D, X


def make_mesh(shape: tuple[int, int], devices=None) -> Mesh:
    """A (data, expert) mesh over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def single_device_mesh() -> Mesh:
    return make_mesh((1, 1), [jax.devices()[0]])


def expert_paths(module: nnx.Module) -> set[tuple]:
    """State paths of the routed-expert arrays of every MoE block in ``module``."""
    return {(*path, name) for path, node in nnx.iter_graph(module) if isinstance(node, MoEBlock)
            for name in EXPERT_ROWS if getattr(node, name, None) is not None}


def param_specs(module: nnx.Module, state: nnx.State):
    """PartitionSpecs for ``state`` (``nnx.split(module)[1]``): expert rows over ``expert``, rest replicated."""
    experts = expert_paths(module)

    def spec(path, _):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        return P("expert") if keys in experts else P()

    return jax.tree_util.tree_map_with_path(spec, state)


def param_bytes(module: nnx.Module) -> tuple[int, int]:
    """(replicated, expert-split) parameter bytes of ``module``."""
    _, state = nnx.split(module)
    specs = param_specs(module, state)
    sizes = [(s == P("expert"), math.prod(a.shape) * jnp.dtype(a.dtype).itemsize)
             for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))]
    return sum(n for e, n in sizes if not e), sum(n for e, n in sizes if e)


def place(tree, specs, mesh: Mesh):
    """Global arrays of ``tree`` laid out by ``specs`` on ``mesh``.

    Arrays already laid out so are kept. Otherwise, with one process, ``jax.device_put``; with
    several, each process builds its own devices' shards from its (full) host copy.
    """

    def put(a, spec):
        sharding = NamedSharding(mesh, spec)
        if isinstance(a, jax.Array) and a.sharding.is_equivalent_to(sharding, a.ndim):
            return a
        if jax.process_count() == 1:
            return jax.device_put(a, sharding)
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree, specs)


def ep_dispatch(*args, axis: str, **kwargs):
    """:func:`~mone_jax.moe.dispatch` on local expert rows, partial outputs summed over ``axis``."""
    y, stats = dispatch(*args, **kwargs)
    return jax.lax.psum(y, axis), stats


def expert_parallel(module: nnx.Module, axis: str = "expert") -> None:
    """Make every MoE block of ``module`` (merged inside shard_map) combine its experts over ``axis``."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, MoEBlock):
            node.dispatch_fn = partial(ep_dispatch, axis=axis)


def reduce_stats(st: ExpertStats, axis: str) -> ExpertStats:
    """Exact collective Chan merge over ``axis``: n = sum n_i, mean = sum n_i mean_i / n,
    m2 = sum (m2_i + n_i (mean_i - mean)^2); sums are summed."""
    n_i = st.count.astype(jnp.float32)[:, None]
    n = jax.lax.psum(n_i, axis)
    mean = jax.lax.psum(n_i * st.mean, axis) / jnp.maximum(n, 1.0)
    m2 = jax.lax.psum(st.m2 + n_i * (st.mean - mean) ** 2, axis)
    count, wsum, reap = jax.lax.psum((st.count, st.weight_sum, st.reap_sum), axis)
    return ExpertStats(count, wsum, mean, m2, reap)


def batch_spec(mesh: Mesh) -> P:
    """Rows split over ``data``; a one-wide data axis leaves them replicated (no collectives needed)."""
    return P("data") if mesh.shape["data"] > 1 else P()


def padded_rows(rows: int, mesh: Mesh) -> int:
    """``rows`` rounded up to a multiple of the data axis."""
    D = mesh.shape["data"]
    return -(-rows // D) * D


def process_rows(mesh: Mesh, rows: int) -> tuple[int, int]:
    """[lo, hi) of a ``rows``-row batch (already padded) that this process's devices hold."""
    idx = NamedSharding(mesh, batch_spec(mesh)).addressable_devices_indices_map((rows,))
    spans = sorted({s[0].indices(rows)[:2] for s in idx.values()})
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise UserError(f"this process's devices hold non-adjacent batch rows {spans} on the mesh "
                        f"{dict(mesh.shape)}: choose another --mesh")
    return spans[0][0], spans[-1][1]


def global_batch(local: np.ndarray, mesh: Mesh, rows: int) -> jax.Array:
    """A global [rows, ...] array split over ``data`` from this process's rows ``local``."""
    sharding = NamedSharding(mesh, batch_spec(mesh))
    return jax.make_array_from_process_local_data(sharding, local, (rows, *local.shape[1:]))


def local_rows(x: jax.Array, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of a global array split over ``data`` (this process's rows), on the host."""
    out = np.empty((hi - lo, *x.shape[1:]), x.dtype)
    for shard in x.addressable_shards:
        a, b, _ = shard.index[0].indices(x.shape[0])
        out[a - lo:b - lo] = np.asarray(shard.data)
    return out
