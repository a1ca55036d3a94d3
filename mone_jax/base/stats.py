"""Per-expert calibration statistics: THE table of fields, one Chan merge, and the stats file.

:data:`FIELDS` lists every per-expert statistic once: its kind (how batches merge), its file key
and its shape. :class:`LayerStats` (device arrays in the jitted step, float64 NumPy on the host),
the device scan merge, the collective merge over mesh axes, the float64 host merge, the
checkpoint tree and the stats file all iterate it. A new statistic is one table entry (a ``sum``
field carries its per-token term, which the dispatch in :mod:`mone_jax.model.moe` evaluates).
"""

from __future__ import annotations

import json
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from mone_jax.base.errors import UserError
from mone_jax.base.files import atomic_write

FORMAT_VERSION = "1"
SEMANTICS = ("exact", "reference")  # exact statistics, or the MoNE reference code's (docs/formats.md)


def check_semantics(semantics: str) -> str:
    """``semantics`` if it is one of :data:`SEMANTICS`, else a UserError naming them."""
    if semantics not in SEMANTICS:
        raise UserError(f"unknown semantics '{semantics}': use one of {', '.join(SEMANTICS)}")
    return semantics


@dataclass(frozen=True)
class Field:
    """One per-expert statistic.

    ``kind``: ``count`` (exact integer, summed), ``sum`` (summed), ``mean`` / ``m2`` (a moments pair
    over the routed tokens: mean and sum of squared deviations, merged by Chan's formula),
    ``ref_count`` / ``ref_mean`` / ``ref_var`` (the reference's per-call recurrence,
    :func:`reference_call`: zero on the device, folded on the host from each batch's exact moments).
    ``key``: the file tensor ``layers.{l}.<key>``; ``per_dim``: shape [E, hidden] instead of [E];
    ``optional``: older files without it load zeros (named in :attr:`Stats.missing`, so that a metric
    reading it refuses them). A ``sum`` field's ``row(y, w)`` gives each routed
    token's term from its raw expert output ``y`` [rows, hidden] and routing weight ``w`` [rows]
    (operators only: it runs on jax arrays inside the dispatch).
    """

    name: str
    kind: str
    key: str
    per_dim: bool = False
    optional: bool = False
    row: Callable | None = None


FIELDS = (
    Field("count", "count", "count"),  # routed non-padding tokens
    Field("weight_sum", "sum", "routing_weight_sum", row=lambda y, w: w),  # applied routing weights
    Field("mean", "mean", "output_mean", per_dim=True),  # raw expert output over routed tokens
    Field("m2", "m2", "output_m2", per_dim=True),
    Field("reap_sum", "sum", "reap_sum", optional=True,  # REAP: weight * ||raw output||_2
          row=lambda y, w: w * ((y * y).sum(-1)) ** 0.5),
    Field("norm_sum", "sum", "output_norm_sum", optional=True,  # MAN: ||raw output||_2
          row=lambda y, w: ((y * y).sum(-1)) ** 0.5),
    # --fit weighted: the novice minimising the routing-weighted squared error, sum g^2 y / sum g^2
    Field("wsq_sum", "sum", "routing_weight_sq_sum", optional=True, row=lambda y, w: w * w),
    Field("wsq_out_sum", "sum", "weighted_output_sum", per_dim=True, optional=True,
          row=lambda y, w: (w * w)[:, None] * y),
    # --semantics reference (docs/formats.md): the zxgx/mode-pd recurrence, one batch = one call
    Field("ref_count", "ref_count", "reference_count", optional=True),  # tokens it counts
    Field("ref_mean", "ref_mean", "reference_mean", per_dim=True, optional=True),  # its running mean
    Field("ref_var", "ref_var", "reference_fluc", per_dim=True, optional=True),  # its approximate variance
)
REFERENCE = tuple(f.name for f in FIELDS if f.kind.startswith("ref_"))
_INTS = ("count", "ref_count")  # kinds held as exact integers on the host
NAMES = tuple(f.name for f in FIELDS)
FLOATS = tuple(f.name for f in FIELDS if f.kind not in _INTS)


def chan_merge(a, b) -> tuple:
    """Merge two :data:`FIELDS`-ordered tuples of statistics over disjoint token sets (pure arithmetic:
    NumPy or jax arrays, any leading expert shape). Exact (Chan et al.) for any split of the tokens."""
    na, nb = a[0] * 1.0, b[0] * 1.0  # counts as floats (float64 for int64 NumPy, float32 for jax ints)
    n = na + nb
    safe = (n + (n == 0))[..., None]  # 1 where both are empty: the merge then keeps zeros
    mean_a = a[NAMES.index("mean")]
    delta = b[NAMES.index("mean")] - mean_a
    out = []
    for f, x, y in zip(FIELDS, a, b):
        if f.kind == "mean":
            out.append(mean_a + delta * nb[..., None] / safe)
        elif f.kind == "m2":
            out.append(x + y + delta**2 * (na * nb)[..., None] / safe)
        else:
            out.append(x + y)
    return tuple(out)


class LayerStats(namedtuple("_LayerStats", NAMES)):
    """One MoE layer's statistics, the fields of :data:`FIELDS` in order: jax arrays on the device
    (a pytree), float64 NumPy arrays (count int64) on the host."""

    __slots__ = ()

    def __new__(cls, *args, **kwargs):
        """Optional fields left out (callers written before they existed) are zeros."""
        given = {**dict(zip(NAMES, args)), **kwargs}
        for f in FIELDS:
            if f.name not in given and f.optional:
                lead = np.shape(given["count"])
                shape = (*lead, np.shape(given["mean"])[-1]) if f.per_dim else lead
                given[f.name] = np.zeros(shape, np.int64 if f.kind in _INTS else np.float64)
        return super().__new__(cls, *(given[n] for n in NAMES))

    @classmethod
    def zeros(cls, num_experts: int, hidden: int) -> LayerStats:
        return cls(*(np.zeros((num_experts, hidden) if f.per_dim else num_experts,
                              np.int64 if f.kind in _INTS else np.float64) for f in FIELDS))

    @classmethod
    def from_batch(cls, s) -> LayerStats:
        """Host float64 copy of device statistics ``s``."""
        return cls(*(np.asarray(x, np.int64 if f.kind in _INTS else np.float64) for f, x in zip(FIELDS, s)))

    def merge(self, other: LayerStats) -> LayerStats:
        """Chan et al. parallel merge: exact for any split of the tokens into batches. The reference
        fields treat ``other`` (a batch fresh from the device) as one call of :func:`reference_call`."""
        return LayerStats(*chan_merge(self, other))._replace(**reference_call(self, other))

    def novice_means(self, ids, semantics: str = "exact", fit: str | None = None) -> np.ndarray:
        """float32 [len(ids), d]: each expert's mean raw output (zeros if it never ran); under ``reference``
        semantics the reference's running mean rounded to bfloat16, as its checkpoints store novices;
        ``fit="weighted"``: the routing-weighted mean ``sum g^2 y / sum g^2``, the constant that minimises the
        squared error ``sum (g y - g c)^2`` of the expert's weighted contribution."""
        ids = np.asarray(ids, np.int64)
        if fit == "weighted":
            wsq = self.wsq_sum[ids][:, None]
            return np.where(wsq > 0, self.wsq_out_sum[ids] / np.where(wsq > 0, wsq, 1.0), 0.0).astype(np.float32)
        if semantics == "reference":
            return self.ref_mean[ids].astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
        return self.mean[ids].astype(np.float32)

    @property
    def var(self) -> np.ndarray:
        """Unbiased per-dimension variance [E, d]; 0 for experts routed fewer than 2 tokens."""
        c = self.count[:, None].astype(np.float64)
        return np.where(c >= 2, self.m2 / np.maximum(c - 1, 1), 0.0)


@dataclass
class Stats:
    """Statistics of every MoE layer (keyed by HF layer index) plus the non-padding token count."""

    layers: dict[int, LayerStats]
    tokens: int = 0
    meta: dict = field(default_factory=dict)  # model_type, num_experts, top_k
    missing: frozenset[str] = frozenset()  # optional fields the statistics file lacked (zeros here)

    @property
    def num_experts(self) -> int:
        return int(next(iter(self.layers.values())).count.shape[0])

    @property
    def hidden(self) -> int:
        return int(next(iter(self.layers.values())).mean.shape[1])

    def merge(self, other: Stats) -> Stats:
        if set(self.layers) != set(other.layers):
            raise UserError("cannot merge statistics of different models (MoE layers differ)")
        return Stats({i: self.layers[i].merge(other.layers[i]) for i in self.layers}, self.tokens + other.tokens,
                     self.meta or other.meta, self.missing | other.missing)

    def nonfinite(self) -> tuple[int, str] | None:
        """(layer, field) of the first statistic holding NaN / Inf, or None."""
        for i, s in self.layers.items():
            for name in FLOATS:
                if not np.all(np.isfinite(getattr(s, name))):
                    return i, name
        return None

    def check_finite(self) -> None:
        if bad := self.nonfinite():
            raise UserError(
                f"calibration statistics of layer {bad[0]} contain NaN/Inf ({bad[1]}): the model weights or "
                "activations overflow; compute in float32 or check the checkpoint"
            )

    def save(self, path: str | Path) -> None:
        """Write the statistics file (docs/formats.md) atomically (temporary sibling, then rename)."""
        path = Path(path)
        tensors = {"tokens": np.asarray(self.tokens, np.int64)}
        skip = () if self.meta.get("semantics") == "reference" else REFERENCE  # only a reference run has them
        for i, s in self.layers.items():
            for f, x in zip(FIELDS, s):
                if f.name in skip or f.name in self.missing:  # never written as if it had been measured
                    continue
                tensors[f"layers.{i}.{f.key}"] = x.astype(np.int64 if f.kind in _INTS else np.float32)
        meta = {k: str(v) for k, v in self.meta.items()}
        meta["format_version"] = FORMAT_VERSION
        data = _canonical(save(tensors, metadata=meta))
        atomic_write(path, lambda tmp: tmp.write_bytes(data))  # a failed write raises OSError

    @classmethod
    def load(cls, path: str | Path) -> Stats:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"statistics file '{path}' does not exist: run `mone-jax calibrate` first")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for corrupt files
            raise UserError(f"'{path}' is not a valid statistics file ({e}): recreate it") from None
        try:
            ids = sorted({int(k.split(".")[1]) for k in t if k.startswith("layers.")})
            layers = {i: LayerStats.from_batch(_read_layer(t, i)) for i in ids}
            tokens = int(t["tokens"])
        except KeyError as e:
            raise UserError(f"'{path}' lacks tensor {e}: it is not a mone-jax statistics file") from None
        except (ValueError, TypeError) as e:
            raise UserError(f"'{path}' is not a mone-jax statistics file ({e}): recreate it") from None
        if not layers:
            raise UserError(f"'{path}' holds no layer statistics: it is not a mone-jax statistics file")
        first = next(iter(layers.values())).mean
        E, d = first.shape if first.ndim == 2 else (0, 0)
        for i, s in layers.items():
            if E == 0 or any(x.shape != ((E, d) if f.per_dim else (E,)) for f, x in zip(FIELDS, s)) \
                    or (s.count < 0).any():
                raise UserError(f"'{path}': the statistics of layer {i} have inconsistent shapes or negative counts: "
                                "the file is corrupt; recreate it")
        missing = frozenset(f.name for f in FIELDS if f.optional and f.name not in REFERENCE
                            and any(f"layers.{i}.{f.key}" not in t for i in ids))
        stats = cls(layers, tokens, {k: v for k, v in meta.items() if k != "format_version"}, missing)
        if bad := stats.nonfinite():
            raise UserError(f"'{path}' holds NaN/Inf (layer {bad[0]} {bad[1]}): the file is corrupt; recreate it "
                            "with `mone-jax calibrate`")
        return stats

    def check_matches(self, model_type: str, num_experts: int, moe_layers: list[int], hidden: int) -> None:
        """UserError when these statistics were not computed for the given model."""
        mt = self.meta.get("model_type")
        if (mt and mt != model_type) or self.num_experts != num_experts or sorted(self.layers) != sorted(moe_layers) \
                or self.hidden != hidden:
            raise UserError(
                f"the statistics (model_type {mt}, {self.num_experts} experts, layers {sorted(self.layers)}) do not "
                f"match the model ({model_type}, {num_experts} experts, layers {moe_layers}): recalibrate"
            )



def _canonical(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its metadata in sorted key order: safetensors writes it in hash order,
    so equal statistics gave different bytes from run to run (tensor offsets count from the header's end)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


def reference_call(acc: LayerStats, batch: LayerStats) -> dict[str, np.ndarray]:
    """The reference fields of ``acc`` after one more forward call over the tokens of ``batch`` (host float64).

    The recurrence of the MoNE reference (zxgx/mode-pd, per expert, ``n`` counted tokens, call of ``b``):
    mean' = (n * mean + sum y) / (n + b); when n > 0, var' = var * (n - 1) / (n + b - 1)
    + sum (y - mean')^2 / (n + b), i.e. the first call's spread is never counted and later calls are
    measured against the updated running mean; a call of one token while n = 0 is dropped entirely.
    sum (y - mean')^2 is the batch's exact m2 + b * (mean_b - mean')^2.
    """
    n = np.asarray(acc.ref_count, np.float64)
    b = np.asarray(batch.count, np.float64)
    take = (b > 0) & ~((n == 0) & (b == 1))
    total = np.maximum(n + b, 1)[:, None]
    mean = acc.ref_mean * (n[:, None] / total) + batch.mean * (b[:, None] / total)
    spread = batch.m2 + b[:, None] * (batch.mean - mean) ** 2
    var = acc.ref_var * ((n - 1) / np.maximum(n + b - 1, 1))[:, None] + spread / total
    keep_var = (take & (n > 0))[:, None]
    return {"ref_count": np.where(take, n + b, n).astype(np.asarray(acc.ref_count).dtype),
            "ref_mean": np.where(take[:, None], mean, acc.ref_mean),
            "ref_var": np.where(keep_var, var, acc.ref_var)}


def _read_layer(t: dict, i: int) -> list[np.ndarray]:
    """Layer i's tensors in :data:`FIELDS` order; a missing optional one (older files) reads as zeros."""
    count, mean = t[f"layers.{i}.count"], t[f"layers.{i}.output_mean"]
    return [t[k] if not f.optional or k in t else np.zeros(mean.shape if f.per_dim else count.shape)
            for f in FIELDS for k in [f"layers.{i}.{f.key}"]]
