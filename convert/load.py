"""Hugging Face folder -> Flax NNX model, reading one tensor at a time.

Besides stock checkpoints this reads checkpoints whose routed experts were pruned to novices,
in the layouts of docs/formats.md (whoever wrote them: this project or the PyTorch
reference): ``substitution`` (config ``compression_config.transform_config.expert_substitution``,
retained experts at compact indices, ``<moe>.expert_replacements.<e>.value``) and ``modepd``
(config ``approximate_experts``, retained experts at their original indices,
``<moe>.experts.<e>.approx_value``). Either gives a pruned :class:`MoEForCausalLM`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import mmap
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from mone_jax.base.config import ModelConfig
from mone_jax.base.errors import UserError
from mone_jax.convert.dequant import Blocks, block_updater, on_device
from mone_jax.convert.families import Family, family, parse_config
from mone_jax.convert.formats import read_novices
from mone_jax.convert.quant import quant_method
from mone_jax.convert.reader import CheckpointReader, read_config
from mone_jax.model.causal_lm import LAYER_NORMS, MLP, DecoderLayer, MoEBlock, MoEForCausalLM
from mone_jax.model.deltanet import DepthwiseConv
from mone_jax.model.layers import LayerNorm, Linear, RMSNorm
from mone_jax.model.moe import EXPERT
from mone_jax.model.sharding import is_expert

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"dtype '{dtype}' is not supported: use one of {', '.join(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


@dataclass(frozen=True)
class PrunedLayout:
    """Where a pruned checkpoint keeps its experts: ``novices[layer][expert]`` = the novice's tensor key;
    ``compact``: retained experts are stored at indices 0..K-1 (else at their original indices)."""

    novices: dict[int, dict[int, str]]
    compact: bool

    def kept(self, layer: int, num_experts: int) -> list[int]:
        nov = self.novices.get(layer, {})
        return [e for e in range(num_experts) if e not in nov]


def pruned_layout(raw: dict, cfg: ModelConfig) -> PrunedLayout | None:
    """The pruned-expert layout declared by config.json ``raw`` (any export format), or None for a stock one."""
    found = read_novices(raw, family(cfg.model_type))
    if found is None:
        return None
    fmt, novices = found
    layout = PrunedLayout(novices, compact=fmt.compact)
    E = cfg.num_experts
    for layer, nov in layout.novices.items():
        if not 0 <= layer < cfg.num_layers or (nov and not cfg.moe_layers[layer]):
            raise UserError(f"config.json prunes layer {layer}, which is not a MoE layer of this model")
        if any(not 0 <= e < E for e in nov) or len(nov) >= E:
            raise UserError(f"config.json prunes experts {sorted(nov)} of layer {layer}: expert ids must lie in "
                            f"0..{E - 1} and at least one expert must be retained")
    return layout


@dataclass(frozen=True)
class _Source:
    """Where a Variable's value comes from: ``read(index)`` gives ``stored[index]`` (``index``: a tuple of
    slices of ``shape``), a NumPy array read from the checkpoint on demand; ``swap``: the model holds it with
    its last two axes swapped (a Linear weight [out, in] is a kernel [in, out])."""

    key: str
    shape: tuple[int, ...]
    read: Callable[[tuple], np.ndarray]
    swap: bool = False
    parts: tuple[str, ...] = ()  # every checkpoint tensor it is made of (default: ``key``)
    fill: Callable[[slice, np.ndarray], None] | None = None  # rows -> writes stored[rows] into an array (stacks)
    dtype: np.dtype | None = None  # what ``read`` / ``fill`` give (needed with ``fill``)
    quant: _Raw | None = None  # quantized: dequantized on the device from these stored parts

    def model_shape(self) -> tuple[int, ...]:
        return (*self.shape[:-2], self.shape[-1], self.shape[-2]) if self.swap else self.shape


@dataclass(frozen=True)
class _Raw:
    """The stored parts of a quantized :class:`_Source` (float8 weights, their block scales, stacked alike along
    the rows) and how they dequantize (:mod:`.dequant`)."""

    weight: _Source
    scale: _Source
    spec: Blocks


def _raw(reader: CheckpointReader, groups: list[list[str]]) -> _Raw | None:
    """The stored parts of the expert stack of quantized tensors ``groups`` (per group, its tensors' rows one
    after the other), or None where they are not dequantized on the device (not quantized, or of another
    scheme, or not 2-D tensors of one block size). Other quantized tensors are dequantized on the host: on
    XLA:CPU their dequantize-and-transpose steps compiled for 5-9 s a layer, longer than they save."""
    st, qs = reader.stored, [reader.quantized(k) for k in groups[0]]
    if any(q is None or len(q.shape) != 2 or set(q.parts) != {"weight", "scale"} for q in qs):
        return None
    dts = {(st.dtype(q.parts["weight"]), st.dtype(q.parts["scale"])) for q in qs}
    if len(dts) > 1 or not on_device(qs[0], *next(iter(dts))) or len({(q.args["block"], q.shape[-1], q.args["grid"][-1])
                                                                       for q in qs}) > 1:
        return None
    rows = tuple((q.shape[0], q.args["grid"][0]) for q in qs)

    def part(role: str, col: int, width: int, dtype: np.dtype) -> _Source:
        at = np.cumsum([0] + [r[col] for r in rows])

        def fill(sel: slice, out: np.ndarray) -> None:
            for i, keys in enumerate(groups[sel]):
                for j, key in enumerate(keys):
                    st.read_raw(reader.quantized(key).parts[role], out[i, at[j]:at[j + 1]])

        def read(idx: tuple) -> np.ndarray:
            out = _aligned((len(groups), int(at[-1]), width), dtype)
            fill(slice(None), out)
            return out[idx]

        return _Source(qs[0].parts[role], (len(groups), int(at[-1]), width), read, fill=fill, dtype=np.dtype(dtype))

    w_dt, s_dt = next(iter(dts))
    return _Raw(part("weight", 0, qs[0].shape[1], w_dt), part("scale", 1, qs[0].args["grid"][1], s_dt),
                Blocks(rows, tuple(qs[0].args["block"])))


def _host(key: str, arr: np.ndarray, swap: bool = False) -> _Source:
    return _Source(key, tuple(arr.shape), lambda idx: arr[idx], swap)


class _Filler:
    """Assigns checkpoint tensors to the Variables of an abstract (eval_shape) module.

    Tensors are read lazily: :meth:`commit` builds each array shard by shard
    (``jax.make_array_from_callback``), each device's rows read from the checkpoint by a small pool of
    threads (a routed-expert stack is split over the mesh's ``expert`` axis, padded with zero rows to a
    multiple of it, and read in blocks of experts; everything else is replicated), then converts every array
    of the module to its declared dtype and layout in one compiled step, which also sums each array for the
    NaN / Inf check. That step runs while the next module is read; :meth:`check` waits for the sums."""

    def __init__(self, reader: CheckpointReader, mesh: Mesh | None = None):
        self.r, self.mesh = reader, mesh
        self.r.check_finite = False  # checked on device, in the same pass as the conversion
        self.pending: list[tuple[nnx.Variable, _Source]] = []
        # committed, not yet checked: (sums, arrays, (key, parts) of each); never the sources, whose reads may
        # hold their raw host arrays (a layer's transposed matrices: 0.5 GiB over OLMoE-1B-7B's 16 layers)
        self.sums: list[tuple[tuple, list[jax.Array], list[tuple[str, tuple[str, ...]]]]] = []

    def add(self, var: nnx.Variable, src: _Source) -> None:
        want = var.get_value()
        if src.model_shape() != tuple(want.shape):
            raise UserError(
                f"tensor '{src.key}' gives shape {list(src.model_shape())} but config.json implies "
                f"{list(want.shape)}: the weights do not belong to this config"
            )
        self.pending.append((var, src))

    def set(self, var: nnx.Variable, arr: np.ndarray, key: str) -> None:
        """``var`` := arr (a host array), in var's declared dtype (float32 for routers kept in float32)."""
        self.add(var, _host(key, np.asarray(arr)))

    def t(self, var: nnx.Variable, key: str) -> None:
        """Linear weight [out, in] -> kernel [in, out]."""
        self.add(var, _Source(key, self.r.shape(key), _whole(self.r, key), swap=True))

    def plain(self, var: nnx.Variable, key: str) -> None:
        self.add(var, _Source(key, self.r.shape(key), _whole(self.r, key)))

    def commit(self) -> None:
        """Build, convert and assign every pending Variable (see the class docstring); the NaN / Inf check
        is left to :meth:`check`."""
        stacks = [(var, src) for var, src in self.pending if src.quant]
        self.pending = [(var, src) for var, src in self.pending if not src.quant]
        if self.pending:
            shardings = [_sharding(self.mesh, is_expert(var)) for var, _ in self.pending]
            reads = [_prefetch(src, sharding, _rows(self.mesh) if is_expert(var) else 1)
                     for (var, src), sharding in zip(self.pending, shardings)]  # all shards in flight at once
            raws = [jax.make_array_from_callback(shape, sharding, fetch)
                    for (shape, fetch), sharding in zip(reads, shardings)]
            del reads
            spec = tuple((src.swap, jnp.dtype(var.get_value().dtype)) for var, src in self.pending)
            values, sums = _convert(raws, spec, tuple(shardings))
            del raws
            for (var, _), value in zip(self.pending, values):
                var.set_value(value)
            self.sums.append((sums, values, [(src.key, src.parts) for _, src in self.pending]))
        for var, src in stacks:
            value, total = _dequantize_stack(src, self.mesh, jnp.dtype(var.get_value().dtype))
            var.set_value(value)
            self.sums.append(((total, np.zeros(1, int)), [value], [(src.key, src.parts)]))
        self.pending.clear()

    def check(self) -> None:
        """UserError naming a tensor that holds NaN / Inf, of every module committed so far."""
        for (sums, at), values, names in self.sums:
            for ok, value, (name, parts) in zip(np.isfinite(np.atleast_1d(np.asarray(sums))[at]), values, names):
                if not ok and not bool(_all_finite(value)):
                    with CheckpointReader(self.r.folder) as r:  # the reader names the tensor that holds them
                        for key in parts or (name,):
                            r.get(key) if key in r else None
                    raise UserError(f"tensor '{name}' in '{self.r.folder}' contains NaN or Inf values: the "
                                    "checkpoint is corrupt; re-download it")
        self.sums.clear()


def _whole(reader: CheckpointReader, key: str) -> Callable[[tuple], np.ndarray]:
    """``tensor[index]``, the tensor read once however many devices ask for it (replicated tensors)."""
    got: list[np.ndarray] = []
    shape = reader.shape(key)

    def read(idx: tuple) -> np.ndarray:
        if all(s.indices(n) == (0, n, 1) for s, n in zip(idx, shape)):
            if not got:
                got.append(_read(reader, key))
            return got[0]
        return reader.get_slice(key, idx)

    return read


def _aligned(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array in its own anonymous mapping (page-aligned, so JAX adopts it on CPU without a copy).
    Not madvised for huge pages: on a machine whose memory is fragmented, their first touch waits for the
    kernel to compact memory, which measured 1.5-2x slower than plain pages (bench/README.md)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if n < 1 << 21:
        raw = np.zeros(n + 64, np.uint8)
        start = -raw.ctypes.data % 64
        return raw[start:start + n].view(dtype).reshape(shape)
    return np.frombuffer(mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype).reshape(shape)


def _read(reader: CheckpointReader, key: str) -> np.ndarray:
    """Tensor ``key`` in aligned memory, copied once from the file where stored as plain floats."""
    dtype = reader.dtype(key)
    if dtype.kind not in "fV":
        return reader.get(key)
    out = _aligned(reader.shape(key), dtype)
    reader.get_into(key, out)
    return out


def _sharding(mesh: Mesh | None, expert: bool) -> jax.sharding.Sharding:
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return NamedSharding(mesh, P(EXPERT) if expert else P())


def _rows(mesh: Mesh | None) -> int:
    """Expert stacks are padded to a multiple of this many rows (the mesh's expert axis)."""
    return 1 if mesh is None else mesh.shape[EXPERT]


READ_THREADS = min(4, os.cpu_count() or 1)  # preads release the GIL: reads overlap each other and the device
BLOCK_BYTES = 64 << 20  # an expert stack is read in blocks of experts of about this size, one per thread task


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(READ_THREADS, thread_name_prefix="mone-read")


def _prefetch(src: _Source, sharding: jax.sharding.Sharding, multiple: int
              ) -> tuple[tuple[int, ...], Callable[[tuple], np.ndarray]]:
    """The global shape of ``src`` (first axis zero-padded to a multiple of ``multiple``) and a callback
    for ``jax.make_array_from_callback`` giving each device's shard; every shard this process holds is
    submitted to the read pool at once (a shard several devices share is read once)."""
    n = src.shape[0] if src.shape else 0
    shape = (-(-n // multiple) * multiple, *src.shape[1:]) if multiple > 1 else src.shape
    key = lambda idx: tuple(s.indices(d) for s, d in zip(idx, shape))  # noqa: E731
    jobs: dict[tuple, Callable[[], np.ndarray]] = {}
    for idx in sharding.addressable_devices_indices_map(shape).values():
        if key(idx) not in jobs:
            jobs[key(idx)] = _submit(src, shape, idx)
    return shape, lambda idx: jobs[key(idx)]()


def _submit(src: _Source, shape: tuple[int, ...], idx: tuple) -> Callable[[], np.ndarray]:
    """Start reading shard ``idx`` of ``src`` (global ``shape``); the function returned waits for it. A stack
    with ``fill`` is read in blocks of rows, one pool task each, into one aligned array."""
    n = src.shape[0] if src.shape else 0
    whole_rows = all(s.indices(d) == (0, d, 1) for s, d in zip(idx[1:], shape[1:]))
    if src.fill is None or not whole_rows:
        task = _pool().submit(_shard, src, shape, idx)
        return task.result
    lo, hi, _ = idx[0].indices(shape[0])
    out = _aligned((hi - lo, *shape[1:]), src.dtype)  # zeroed: padding rows stay zero
    step, end = max(1, BLOCK_BYTES // max(1, out[:1].nbytes)), min(hi, n)
    tasks: list[Future] = [_pool().submit(src.fill, slice(a, min(a + step, end)), out[a - lo:min(a + step, end) - lo])
                           for a in range(lo, end, step)]

    def result() -> np.ndarray:
        for t in tasks:
            t.result()
        return out

    return result


def _dequantize_stack(src: _Source, mesh: Mesh | None, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """Quantized expert stack ``src`` in ``dtype`` (split over the mesh's ``expert`` axis, padded like any
    stack) and its float32 sum: each device's rows dequantized a block of experts at a time into the output
    (:func:`~.dequant.block_updater`), the next block read while the device works on this one."""
    q, sharding, m = src.quant, _sharding(mesh, True), _rows(mesh)
    n = src.shape[0]
    per = -(-n // m)  # rows per expert shard
    step = max(1, min(per, BLOCK_BYTES // max(1, q.weight.dtype.itemsize * int(np.prod(q.weight.shape[1:])))))
    out = jax.jit(lambda: jnp.zeros((per * m, *src.shape[1:]), dtype), out_shardings=sharding)()
    total = jax.device_put(jnp.float32(0), _sharding(mesh, False))
    update = block_updater(mesh, q.spec, dtype)

    def start(j: int) -> list[tuple]:
        b = min(step, per - j)
        return [_block(part, sharding, j, b, per) for part in (q.weight, q.scale)]

    ahead = start(0)
    for j in range(0, per, step):
        now, ahead = ahead, (start(j + step) if j + step < per else None)
        w, s = (jax.make_array_from_callback(shape, sharding, fetch) for shape, fetch in now)
        out, total = update(out, total, w, s, j)
        del w, s
    return out, total


def _block(src: _Source, sharding: jax.sharding.Sharding, j: int, b: int, per: int
           ) -> tuple[tuple[int, ...], Callable[[tuple], np.ndarray]]:
    """Block ``j..j+b`` of every expert shard's rows of stack ``src`` (``per`` rows a shard) as a global array
    of ``b`` rows per shard: its shape and a callback giving each device's rows (zeros past the stack),
    submitted to the read pool at once."""
    shape = (b * (sharding.mesh.shape[EXPERT] if isinstance(sharding, NamedSharding) else 1), *src.shape[1:])
    jobs: dict[int, tuple[Future | None, np.ndarray]] = {}
    for idx in sharding.addressable_devices_indices_map(shape).values():
        d = (idx[0].start or 0) // b
        if d not in jobs:
            lo = d * per + j
            hi = min(lo + b, src.shape[0])
            out = _aligned((b, *src.shape[1:]), src.dtype)
            task = _pool().submit(src.fill, slice(lo, hi), out[:max(0, hi - lo)]) if hi > lo else None
            jobs[d] = (task, out)

    def fetch(idx: tuple) -> np.ndarray:
        task, out = jobs[(idx[0].start or 0) // b]
        if task is not None:
            task.result()
        return out

    return shape, fetch


def _shard(src: _Source, shape: tuple[int, ...], idx: tuple) -> np.ndarray:
    """Shard ``idx`` of ``src`` padded to the global ``shape`` (zero rows past the source's)."""
    n = src.shape[0] if src.shape else 0
    if shape == src.shape:
        return np.asarray(src.read(idx))
    lo, hi, _ = idx[0].indices(shape[0])
    part = src.read((slice(lo, min(hi, n)), *idx[1:])) if lo < n else None
    if hi <= n:
        return np.asarray(part)
    pad_shape = (hi - max(lo, n), *(len(range(*s.indices(d))) for s, d in zip(idx[1:], shape[1:])))
    dtype = (part if part is not None else src.read((slice(0, 1), *idx[1:]))).dtype  # a shard of padding only
    pad = np.zeros(pad_shape, dtype)
    return pad if part is None else np.concatenate([part, pad])


def _sum(x):
    """A float32 sum: NaN / Inf anywhere show in it (an overflow too: then the exact check decides)."""
    return jnp.sum(x, dtype=jnp.float32) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.float32(0)


@functools.partial(jax.jit, static_argnums=(2, 3), donate_argnums=0)
def _convert_jit(changed, kept, spec, shardings):
    outs = [jax.lax.with_sharding_constraint((jnp.swapaxes(x, -1, -2) if swap else x).astype(dtype), sharding)
            for x, (swap, dtype), sharding in zip(changed, spec, shardings)]
    return outs, jnp.stack([_sum(x) for x in (*changed, *kept)])


@jax.jit
def _all_finite(x):
    return jnp.isfinite(x).all()


def _convert(raws, spec, shardings) -> tuple[list[jax.Array], tuple[jax.Array, np.ndarray]]:
    """Each raw array in its declared dtype and layout (one already so is kept as it is: no copy), and a float32
    sum of each (NaN / Inf show in it), as (sums, the index in them of each array): one compiled step,
    dispatched without waiting for it."""
    import warnings

    keep = [not swap and x.dtype == dtype for x, (swap, dtype) in zip(raws, spec)]
    order = [i for i, k in enumerate(keep) if not k] + [i for i, k in enumerate(keep) if k]
    n = keep.count(False)
    with warnings.catch_warnings():  # donated buffers that XLA cannot reuse (a cast, a transpose) are fine
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        changed, sums = _convert_jit([raws[i] for i in order[:n]], [raws[i] for i in order[n:]],
                                     tuple(spec[i] for i in order[:n]), tuple(shardings[i] for i in order[:n]))
    outs: list = [None] * len(raws)
    for i, y in zip(order, [*changed, *(raws[i] for i in order[n:])]):
        outs[i] = y
    return outs, (sums, np.argsort(order))


def _attention(f: _Filler, attn: nnx.Module, p: str, names: Mapping[str, str]) -> None:
    """Every Linear / RMSNorm / conv and direct parameter (GPT-OSS sinks, DeltaNet A_log) of a token mixer,
    named as in transformers, or renamed by ``names``."""
    for name, mod in vars(attn).items():
        name = names.get(name, name)
        if isinstance(mod, Linear):
            f.t(mod.kernel, f"{p}.{name}.weight")
            if mod.bias is not None:
                f.plain(mod.bias, f"{p}.{name}.bias")
        elif isinstance(mod, (RMSNorm, DepthwiseConv)):
            f.plain(mod.weight, f"{p}.{name}.weight")
        elif isinstance(mod, nnx.Param):
            f.plain(mod, f"{p}.{name}")


def _mlp(f: _Filler, m: MLP, p: str, names=("gate_proj", "up_proj", "down_proj")) -> None:
    g, u, d = (f"{p}.{n}.weight" for n in names)
    dt = np.dtype(m.gate_up.get_value().dtype)
    f.add(m.gate_up, _Source(g, (f.r.shape(g)[0] + f.r.shape(u)[0], *f.r.shape(g)[1:]),
                             lambda idx: _stack(f.r, [[g, u]], dt)[0][idx], swap=True, parts=(g, u)))
    f.t(m.down, d)


def _stored_rows(reader: CheckpointReader, key: str, kept: list[int], num_experts: int) -> list[int]:
    """Rows of the retained experts in a fused [E or K, ...] stack (pruned exports keep K rows)."""
    n = reader.shape(key)[0]
    if n == len(kept):
        return list(range(n))
    if n == num_experts:
        return kept
    raise UserError(f"'{key}' has {n} expert rows, expected {num_experts} (all) or {len(kept)} (retained)")


def _get_rows(reader: CheckpointReader, key: str, rows: list[int]) -> np.ndarray:
    """Rows ``rows`` of ``key``: one slice where they are consecutive, else gathered."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return reader.get_slice(key, slice(rows[0], rows[0] + len(rows)))
    return reader.get_slice(key, np.asarray(rows, np.int64))


def _fused_rows(reader: CheckpointReader, key: str, kept: list[int], num_experts: int) -> np.ndarray:
    return _get_rows(reader, key, _stored_rows(reader, key, kept, num_experts))


def _gpt_oss_weight(reader: CheckpointReader, key: str, rows: list[int], dtype) -> np.ndarray:
    """Stored rows ``rows`` of GPT-OSS weight ``key`` as [n, in, out]: plain, or MXFP4 (dequantized by the
    reader one expert at a time, in ``dtype``)."""
    if not reader.quantized(key):
        return _get_rows(reader, key, rows)
    return np.stack([reader.get_slice(key, r).astype(dtype) for r in rows])


def _deinterleave(a: np.ndarray) -> np.ndarray:
    """GPT-OSS fused [..., 2f] with gate/up interleaved -> [gate | up] halves."""
    return np.concatenate([a[..., 0::2], a[..., 1::2]], axis=-1)


def _stack_dtype(reader: CheckpointReader, key: str, dtype) -> np.dtype:
    """The dtype :func:`_stack` gives for tensors like ``key``: the stored float dtype, ``dtype`` where quantized."""
    first = np.dtype(dtype) if reader.quantized(key) else reader.dtype(key)
    return first if first.kind in "fV" else np.dtype(np.float32)


def _stack_into(reader: CheckpointReader, groups: list[list[str]], out: np.ndarray) -> None:
    """``out`` [len(groups), rows, ...] := per group, its tensors' rows one after the other (gate rows, then up
    rows), each copied once from the file; quantized ones dequantized one tensor at a time."""
    rows = np.cumsum([0] + [reader.shape(k)[0] for k in groups[0]])
    for i, keys in enumerate(groups):
        for j, key in enumerate(keys):
            reader.get_into(key, out[i, rows[j]:rows[j + 1]])


def _stack(reader: CheckpointReader, groups: list[list[str]], dtype) -> np.ndarray:
    """:func:`_stack_into` a new aligned array (of :func:`_stack_dtype`)."""
    shapes = [reader.shape(k) for k in groups[0]]
    out = _aligned((len(groups), sum(s[0] for s in shapes), *shapes[0][1:]), _stack_dtype(reader, groups[0][0], dtype))
    _stack_into(reader, groups, out)
    return out


def _expert_source(reader: CheckpointReader, fam: Family, layer: int, kept: list[int], disk: list[int],
                   num_experts: int, which: int, dtype=np.float32) -> _Source:
    """The routed experts ``kept`` (original ids; ``disk``: their on-disk indices) of ``layer``: gate_up
    (``which`` 0) or down (1), read expert by expert for the rows asked. The model holds them as the hub and
    transformers layouts store them ([K, 2f, d] gate rows then up rows, [K, d, f]): a copy, no transpose.
    GPT-OSS's [K, d, 2f] (interleaved; maybe MXFP4, dequantized to ``dtype``) is swapped on device."""
    pre = f"{fam.moe_prefix(layer)}.experts"
    K = len(kept)
    if fam.fused_on_disk:  # GPT-OSS: gate_up [E, d, 2f] interleaved, down [E, f, d]; maybe MXFP4
        key = f"{pre}.{('gate_up_proj', 'down_proj')[which]}"
        rows = _stored_rows(reader, key, kept, num_experts)
        one = _gpt_oss_weight(reader, key, rows[:1], dtype)[0]

        def read(idx):
            w = _gpt_oss_weight(reader, key, rows[idx[0]], dtype)
            return (_deinterleave(w) if which == 0 else w)[(slice(None), *idx[1:])]

        return _Source(key, (K, *one.shape), read, swap=True)
    if f"{pre}.gate_up_proj" in reader:  # transformers' in-memory layout: gate_up [E, 2f, d], down [E, d, f]
        key = f"{pre}.{('gate_up_proj', 'down_proj')[which]}"
        rows = _stored_rows(reader, key, kept, num_experts)
        return _Source(key, (K, *reader.shape(key)[1:]),
                       lambda idx: _get_rows(reader, key, rows[idx[0]])[(slice(None), *idx[1:])])
    parts = (0, 1) if which == 0 else (2,)
    shapes = [reader.shape(fam.expert_key(layer, disk[0], j)) for j in parts]
    groups = [[fam.expert_key(layer, e, j) for j in parts] for e in disk]
    return _Source(groups[0][0], (K, sum(s[0] for s in shapes), *shapes[0][1:]),
                   lambda idx: _stack(reader, groups[idx[0]], dtype)[(slice(None), *idx[1:])],
                   parts=tuple(k for g in groups for k in g),
                   fill=lambda rows, out: _stack_into(reader, groups[rows], out),
                   dtype=_stack_dtype(reader, groups[0][0], dtype), quant=_raw(reader, groups))


def expert_weights(reader: CheckpointReader, fam: Family, layer: int, kept: list[int], disk: list[int],
                   num_experts: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Weights of the routed experts ``kept`` (original ids; ``disk``: their on-disk indices) of ``layer`` as
    [in, out] matrices: gate_up [K, d, 2f] (gate half, then up half) and down [K, f, d]; MXFP4 dequantized
    to ``dtype``, others in their stored dtype. Biases are not part of them."""
    out = []
    for which in (0, 1):
        src = _expert_source(reader, fam, layer, kept, disk, num_experts, which, dtype)
        a = src.read(tuple(slice(None) for _ in src.shape))
        out.append(a if src.swap else a.swapaxes(-1, -2))  # the source gives [K, in, out] where it swaps
    return out[0], out[1]


def _experts(f: _Filler, fam: Family, blk: MoEBlock, layer: int, kept: list[int], disk: list[int]) -> None:
    """Retained experts ``kept`` (original ids) stored at on-disk indices ``disk`` into blk's [K, ...] stacks."""
    pre = f"{fam.moe_prefix(layer)}.experts"
    E = blk.cfg.num_experts
    dt = np.dtype(blk.gate_up.get_value().dtype)
    f.add(blk.gate_up, _expert_source(f.r, fam, layer, kept, disk, E, 0, dt))
    f.add(blk.down, _expert_source(f.r, fam, layer, kept, disk, E, 1, dt))
    if fam.fused_on_disk:  # GPT-OSS biases, gate/up interleaved like the weight
        f.set(blk.gate_up_bias, _deinterleave(_fused_rows(f.r, f"{pre}.gate_up_proj_bias", kept, E)),
              f"{pre}.gate_up_proj_bias")
        f.set(blk.down_bias, _fused_rows(f.r, f"{pre}.down_proj_bias", kept, E), f"{pre}.down_proj_bias")


def _moe(f: _Filler, fam: Family, blk: MoEBlock, layer: int, layout: PrunedLayout | None) -> None:
    pre = fam.moe_prefix(layer)
    E, d = blk.cfg.num_experts, blk.cfg.hidden_size
    f.t(blk.router, fam.router_key(layer))
    if blk.router_bias is not None:
        f.plain(blk.router_bias, fam.router_key(layer, "bias"))
    if blk.score_bias is not None:
        f.set(blk.score_bias, f.r.get(fam.score_bias_key(layer)).reshape(-1), fam.score_bias_key(layer))
    novices = layout.novices.get(layer, {}) if layout else {}
    kept = [e for e in range(E) if e not in novices]
    disk = list(range(len(kept))) if layout and layout.compact else kept
    _experts(f, fam, blk, layer, kept, disk)
    f.set(blk.kept_ids, np.asarray(kept, np.int32), f"{pre} kept experts")
    nov = sorted(novices)
    f.set(blk.novice_ids, np.asarray(nov, np.int32).reshape(len(nov)), f"{pre} novice experts")
    values = np.stack([f.r.get(novices[e], (d,)) for e in nov]) if nov else np.zeros((0, d), np.float32)
    f.set(blk.novice_values, values, novices[nov[0]] if nov else f"{pre} novices")
    if blk.shared is not None:
        _mlp(f, blk.shared, f"{pre}.{fam.shared_expert}")
        if blk.shared_gate is not None:
            f.t(blk.shared_gate, f"{pre}.{fam.shared_expert_gate}.weight")


def _fill_layer(f: _Filler, fam: Family, layer: DecoderLayer, i: int, layout: PrunedLayout | None) -> None:
    p = f"model.layers.{i}"
    for name in LAYER_NORMS:
        if (norm := getattr(layer, name)) is not None:
            f.plain(norm.weight, f"{p}.{name}.weight")
            if isinstance(norm, LayerNorm):
                f.plain(norm.bias, f"{p}.{name}.bias")
    _attention(f, layer.mixer, f"{p}.{layer.mixer_name}", fam.attn_names)
    if layer.is_moe:
        _moe(f, fam, layer.mlp, i, layout)
    else:
        _mlp(f, layer.mlp, f"{p}.{fam.dense_mlp_module}")


def check_quantization(raw: dict, cfg: ModelConfig) -> None:
    """UserError for a quantization method no scheme of :mod:`.quant` reads (the reader dequantizes the rest)."""
    quant_method(raw)


def kept_counts(folder: str | Path) -> dict[int, int]:
    """{MoE layer: retained experts} of the pruned layers of a checkpoint ({} for a stock one)."""
    raw = read_config(folder)
    cfg = parse_config(raw)
    layout = pruned_layout(raw, cfg)
    if layout is None:
        return {}
    return {i: len(layout.kept(i, cfg.num_experts)) for i, nov in layout.novices.items() if nov}


def refuse_pruned(folder: str | Path) -> None:
    """UserError when ``folder`` holds a pruned checkpoint (calibration needs the original model)."""
    if kept_counts(folder):
        raise UserError(f"'{folder}' is already pruned: calibrate the original model")


def load_layer(reader: CheckpointReader, cfg: ModelConfig, layer_index: int, dtype="float32", *,
               mesh: Mesh | None = None) -> DecoderLayer:
    """Decoder layer ``layer_index`` read from ``reader`` (pruned if the config says so); with ``mesh``, placed
    on it shard by shard (expert stacks split over its ``expert`` axis, padded with inert rows), else on
    the first local device."""
    layer, f = _load_layer(reader, cfg, layer_index, dtype, mesh)
    f.check()
    return layer


def _load_layer(reader: CheckpointReader, cfg: ModelConfig, layer_index: int, dtype, mesh: Mesh | None
                ) -> tuple[DecoderLayer, _Filler]:
    """:func:`load_layer` with its NaN / Inf check left to the filler returned."""
    dt = resolve_dtype(dtype)
    raw = read_config(reader.folder)
    check_quantization(raw, cfg)
    if not 0 <= layer_index < cfg.num_layers:
        raise UserError(f"layer {layer_index} does not exist: the model has {cfg.num_layers} layers")
    layout = pruned_layout(raw, cfg)
    kept = len(layout.kept(layer_index, cfg.num_experts)) if layout and layout.novices.get(layer_index) else None
    layer = nnx.eval_shape(lambda: DecoderLayer(cfg, layer_index, dt, nnx.Rngs(0), kept))
    f = _Filler(reader, mesh)
    _fill_layer(f, family(cfg.model_type), layer, layer_index, layout)
    f.commit()
    _check_filled(layer)
    return layer, f


def _fill_embed_and_head(f: _Filler, model: MoEForCausalLM) -> None:
    cfg = model.config
    f.plain(model.embed, "model.embed_tokens.weight")
    f.plain(model.norm.weight, "model.norm.weight")
    if not cfg.tie_word_embeddings:
        f.t(model.lm_head, "lm_head.weight")
    if cfg.layer_norm:
        f.plain(model.norm.bias, "model.norm.bias")
    if cfg.lm_head_bias:
        f.plain(model.lm_head_bias, "lm_head.bias")


def load_hf(folder: str | Path, dtype="float32", *, mesh: Mesh | None = None, progress: bool = True) -> MoEForCausalLM:
    """Load a Hugging Face MoE checkpoint folder (safetensors) as a Flax NNX model.

    A folder pruned in any export format loads as a pruned model (its novices and retained experts
    in place), so it can be checked against its PyTorch logits. With ``mesh`` every array is built shard by
    shard on the mesh (experts split over its ``expert`` axis): a process reads from disk only the expert
    rows its devices hold, plus the replicated tensors, and no device ever holds more than its share of an
    expert stack. The files are reopened per layer, so no host holds more than one layer beyond its share.
    """
    raw = read_config(folder)
    cfg = parse_config(raw)
    check_quantization(raw, cfg)
    dt = resolve_dtype(dtype)
    model = nnx.eval_shape(lambda: MoEForCausalLM(cfg, dt, rngs=nnx.Rngs(0), kept=kept_counts(folder)))
    drop = _memory_short(folder, model)
    with _no_gc():
        _fill_model(folder, model, cfg, dt, mesh, drop, progress)
    return model


@contextlib.contextmanager
def _no_gc():
    """The cyclic garbage collector paused: a load allocates few objects but many arrays, and each full
    collection walks every object of the process (measured: 7% of a load's CPU time)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _fill_model(folder: str | Path, model: MoEForCausalLM, cfg: ModelConfig, dt: jnp.dtype, mesh: Mesh | None,
                drop: bool, progress: bool) -> None:
    """:func:`load_hf`'s reading: the embeddings and head, then layer by layer, then the NaN / Inf check."""
    with CheckpointReader(folder) as r:
        r.drop_read = drop
        f = _Filler(r, mesh)
        _fill_embed_and_head(f, model)
        f.commit()
    fillers = [f]
    for i in tqdm(range(cfg.num_layers), desc="loading layers", disable=not progress, leave=False):
        with CheckpointReader(folder) as r:  # reopened per layer: the file pages read leave memory
            r.drop_read = drop
            model.layers[i], f = _load_layer(r, cfg, i, dt, mesh)
        fillers.append(f)  # each layer's conversion and sums run on the device while the next one is read
    for f in fillers:
        f.check()
    _check_filled(model)


def _memory_short(folder: str | Path, model: nnx.Module) -> bool:
    """Whether the model's weights and the checkpoint's files cannot both stay in this host's memory: then the
    pages a load has read are dropped from the page cache (they are not needed again), so that the kernel
    does not evict the pages still to be read instead (measured: 0.7 GB/s read cold against 3-6 warm here)."""
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
    files = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    return weights + files > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_filled(module: nnx.Module) -> None:
    for path, leaf in nnx.to_flat_state(nnx.state(module)):
        if isinstance(leaf.get_value(), jax.ShapeDtypeStruct):
            raise UserError(f"no checkpoint tensor was loaded for {'.'.join(map(str, path))}: missing tensors")


def config_of(folder: str | Path) -> ModelConfig:
    return parse_config(read_config(folder))
