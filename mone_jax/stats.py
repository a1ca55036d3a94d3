"""Per-expert calibration statistics: exact Chan/Welford merge on the host and the stats file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from mone_jax.errors import UserError

FORMAT_VERSION = "1"


@dataclass
class LayerStats:
    """Moments of one MoE layer's raw expert outputs (float64 on the host)."""

    count: np.ndarray  # [E] int64
    weight_sum: np.ndarray  # [E]
    mean: np.ndarray  # [E, d]
    m2: np.ndarray  # [E, d]
    reap_sum: np.ndarray  # [E]

    @classmethod
    def zeros(cls, num_experts: int, hidden: int) -> LayerStats:
        E, d = num_experts, hidden
        return cls(np.zeros(E, np.int64), np.zeros(E), np.zeros((E, d)), np.zeros((E, d)), np.zeros(E))

    @classmethod
    def from_batch(cls, s) -> LayerStats:
        """From a device :class:`~mone_jax.moe.ExpertStats` (or any object with its fields)."""
        return cls(
            np.asarray(s.count, np.int64), np.asarray(s.weight_sum, np.float64), np.asarray(s.mean, np.float64),
            np.asarray(s.m2, np.float64), np.asarray(s.reap_sum, np.float64),
        )

    def merge(self, other: LayerStats) -> LayerStats:
        """Chan et al. parallel merge: exact for any split of the tokens into batches."""
        na, nb = self.count.astype(np.float64), other.count.astype(np.float64)
        n = na + nb
        safe = np.maximum(n, 1.0)
        delta = other.mean - self.mean
        return LayerStats(
            self.count + other.count,
            self.weight_sum + other.weight_sum,
            self.mean + delta * (nb / safe)[:, None],
            self.m2 + other.m2 + delta**2 * (na * nb / safe)[:, None],
            self.reap_sum + other.reap_sum,
        )

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
                     self.meta or other.meta)

    def nonfinite(self) -> tuple[int, str] | None:
        """(layer, field) of the first statistic holding NaN / Inf, or None."""
        for i, s in self.layers.items():
            for name in ("weight_sum", "mean", "m2", "reap_sum"):
                if not np.all(np.isfinite(getattr(s, name))):
                    return i, name
        return None

    def check_finite(self) -> None:
        if bad := self.nonfinite():
            raise UserError(
                f"calibration statistics of layer {bad[0]} contain NaN/Inf ({bad[1]}): the model weights or "
                "activations overflow; use --dtype float32 or check the checkpoint"
            )

    def save(self, path: str | Path) -> None:
        """Write the statistics file (docs/formats.md) atomically (temporary sibling, then rename)."""
        path = Path(path)
        tensors = {"tokens": np.asarray(self.tokens, np.int64)}
        for i, s in self.layers.items():
            tensors[f"layers.{i}.count"] = s.count.astype(np.int64)
            tensors[f"layers.{i}.routing_weight_sum"] = s.weight_sum.astype(np.float32)
            tensors[f"layers.{i}.output_mean"] = s.mean.astype(np.float32)
            tensors[f"layers.{i}.output_m2"] = s.m2.astype(np.float32)
            tensors[f"layers.{i}.reap_sum"] = s.reap_sum.astype(np.float32)
        meta = {k: str(v) for k, v in self.meta.items()}
        meta["format_version"] = FORMAT_VERSION
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_bytes(save(tensors, metadata=meta))  # a failed write raises OSError
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)

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
            layers = {
                i: LayerStats(
                    t[f"layers.{i}.count"].astype(np.int64),
                    t[f"layers.{i}.routing_weight_sum"].astype(np.float64),
                    t[f"layers.{i}.output_mean"].astype(np.float64),
                    t[f"layers.{i}.output_m2"].astype(np.float64),
                    t.get(f"layers.{i}.reap_sum", np.zeros_like(t[f"layers.{i}.routing_weight_sum"])).astype(np.float64),
                )
                for i in ids
            }
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
            if E == 0 or s.mean.shape != (E, d) or s.m2.shape != (E, d) \
                    or any(a.shape != (E,) for a in (s.count, s.weight_sum, s.reap_sum)) or (s.count < 0).any():
                raise UserError(f"'{path}': the statistics of layer {i} have inconsistent shapes or negative counts: "
                                "the file is corrupt; recreate it")
        stats = cls(layers, tokens, {k: v for k, v in meta.items() if k != "format_version"})
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

