"""Independent float64 NumPy references computed from transformers' own forward pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def experts_modules(hf_model) -> dict[int, torch.nn.Module]:
    """{layer index: the transformers experts module} of every MoE layer."""
    out = {}
    for i, layer in enumerate(hf_model.model.layers):
        mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        if hasattr(mlp, "experts"):
            out[i] = mlp.experts
    return out


def capture_routing(hf_model, ids: np.ndarray, mask: np.ndarray | None = None) -> dict[int, tuple]:
    """Run transformers and record, per MoE layer, the experts module's inputs:
    (hidden [N, d], top_k_index [N, k], top_k_weights [N, k]) as float64 / int arrays.

    Every family calls its experts module with these three positionally (GPT-OSS names them
    router_indices / routing_weights), so routing is transformers' own."""
    seen: dict[int, tuple] = {}
    hooks = []
    for i, mod in experts_modules(hf_model).items():
        def hook(module, args, kwargs, i=i):
            names = ("top_k_index", "top_k_weights", "router_indices", "routing_weights")
            h, idx, w = (list(args) + [kwargs[k] for k in names if k in kwargs])[:3]
            seen[i] = (h.detach().double().numpy(), idx.detach().numpy(), w.detach().double().numpy())
        hooks.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            hf_model(torch.as_tensor(ids), attention_mask=None if mask is None else torch.as_tensor(mask))
    finally:
        for h in hooks:
            h.remove()
    return seen


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def expert_output(mod, e: int, x: np.ndarray) -> np.ndarray:
    """Raw output (before the routing weight) of expert e of a transformers (fused, in-memory) experts module,
    float64. GPT-OSS: gate_up [d, 2f] with gate/up interleaved, biases, clamped alpha-sigmoid GLU."""
    if hasattr(mod, "gate_up_proj_bias"):
        h = x @ _np(mod.gate_up_proj[e]) + _np(mod.gate_up_proj_bias[e])
        gate, up = np.minimum(h[..., 0::2], mod.limit), np.clip(h[..., 1::2], -mod.limit, mod.limit)
        act = gate / (1.0 + np.exp(-mod.alpha * gate)) * (up + 1)
        return act @ _np(mod.down_proj[e]) + _np(mod.down_proj_bias[e])
    h = x @ _np(mod.gate_up_proj[e]).T  # gate_up [2f, d]
    f = h.shape[-1] // 2
    return (_silu(h[..., :f]) * h[..., f:]) @ _np(mod.down_proj[e]).T  # down [d, f]


@dataclass
class Routed:
    """One MoE layer seen by transformers, float64: per expert its routed raw outputs ``y[e]`` [n, d], routing
    weights ``w[e]`` [n] and the forward call (batch) of each row ``call[e]`` [n]; the run's ``tokens``."""

    y: list[np.ndarray]
    w: list[np.ndarray]
    call: list[np.ndarray]
    tokens: int

    def per_expert(self, fn: Callable[[np.ndarray, np.ndarray, np.ndarray], object]) -> np.ndarray:
        """``fn(y, w, call)`` of every expert; zeros of its shape for an expert no token reached."""
        vals = {e: np.asarray(fn(y, w, c), np.float64) for e, (y, w, c) in enumerate(zip(self.y, self.w, self.call))
                if len(w)}
        zero = np.zeros_like(next(iter(vals.values())))
        return np.stack([vals.get(e, zero) for e in range(len(self.w))])


def _norm(y: np.ndarray) -> np.ndarray:
    return np.linalg.norm(y, axis=-1)


def _var(y: np.ndarray) -> np.ndarray:
    return y.var(0, ddof=1) if len(y) > 1 else np.zeros(y.shape[-1])


def _reference_calls(y: np.ndarray, call: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(count, mean, var) of the MoNE reference's per-call recurrence (zxgx/mode-pd) over an expert's rows: a
    call of b rows moves the mean to (n mean + sum y) / (n + b); once n > 0 the variance becomes
    var (n - 1) / (n + b - 1) + sum (y - new mean)^2 / (n + b); a one-row call while n = 0 is dropped."""
    n, mean, var = 0, np.zeros(y.shape[-1]), np.zeros(y.shape[-1])
    for k in np.unique(call):
        rows = y[call == k]
        b = len(rows)
        if n == 0 and b == 1:
            continue
        new = (n * mean + rows.sum(0)) / (n + b)
        if n > 0:
            var = var * (n - 1) / (n + b - 1) + ((rows - new) ** 2).sum(0) / (n + b)
        n, mean = n + b, new
    return n, mean, var


# One float64 formula per statistic of mone_jax.base.stats.FIELDS, from the layer's routed rows.
FIELDS_F64: dict[str, Callable[[Routed], np.ndarray]] = {
    "count": lambda r: r.per_expert(lambda y, w, c: len(w)),
    "weight_sum": lambda r: r.per_expert(lambda y, w, c: w.sum()),
    "mean": lambda r: r.per_expert(lambda y, w, c: y.mean(0)),
    "m2": lambda r: r.per_expert(lambda y, w, c: ((y - y.mean(0)) ** 2).sum(0)),
    "reap_sum": lambda r: r.per_expert(lambda y, w, c: (w * _norm(y)).sum()),
    "norm_sum": lambda r: r.per_expert(lambda y, w, c: _norm(y).sum()),
    "wsq_sum": lambda r: r.per_expert(lambda y, w, c: (w**2).sum()),
    "wsq_out_sum": lambda r: r.per_expert(lambda y, w, c: (w[:, None] ** 2 * y).sum(0)),
    "ref_count": lambda r: r.per_expert(lambda y, w, c: _reference_calls(y, c)[0]),
    "ref_mean": lambda r: r.per_expert(lambda y, w, c: _reference_calls(y, c)[1]),
    "ref_var": lambda r: r.per_expert(lambda y, w, c: _reference_calls(y, c)[2]),
}

# One float64 formula per statistics metric of mone_jax.pruning.scoring.REGISTRY: its scores [E] under
# semantics "exact" (METRICS_F64) and, where the metric has one, "reference" (REFERENCE_METRICS_F64).
METRICS_F64: dict[str, Callable[[Routed, np.random.Generator], np.ndarray]] = {
    "mone": lambda r, rng: r.per_expert(lambda y, w, c: w.sum() / r.tokens * np.sqrt(_var(y).sum())),
    "frequency": lambda r, rng: r.per_expert(lambda y, w, c: len(w) / r.tokens),
    "routing-score": lambda r, rng: r.per_expert(lambda y, w, c: w.sum() / r.tokens),
    "variance": lambda r, rng: r.per_expert(lambda y, w, c: np.sqrt(_var(y).sum())),
    "reap": lambda r, rng: r.per_expert(lambda y, w, c: (w * _norm(y)).mean()),
    "man": lambda r, rng: r.per_expert(lambda y, w, c: _norm(y).mean()),
    "msan": lambda r, rng: r.per_expert(lambda y, w, c: (_norm(y) ** 2).mean()),
    "random": lambda r, rng: rng.random(len(r.w)),
}
REFERENCE_METRICS_F64: dict[str, Callable[[Routed, np.random.Generator], np.ndarray]] = {
    "mone": lambda r, rng: r.per_expert(
        lambda y, w, c: w.sum() / r.tokens * np.sqrt(_reference_calls(y, c)[2].sum())),
    "routing-score": lambda r, rng: r.per_expert(lambda y, w, c: w.sum() / r.tokens),
}


# One float64 formula per weights-only metric of the registry: the score of expert e of a transformers
# (fused) experts module.
WEIGHT_METRICS_F64: dict[str, Callable[[torch.nn.Module, int], float]] = {
    "aimer": lambda mod, e: -np.abs(x := _weights(mod, e)).mean() / np.sqrt((x**2).mean()),  # every entry
}


def _weights(mod, e: int) -> np.ndarray:
    """Every entry of expert e's gate, up and down matrices (no biases), float64."""
    return np.concatenate([_np(mod.gate_up_proj[e]).ravel(), _np(mod.down_proj[e]).ravel()])


def reference_stats(hf_model, batches: list[tuple[np.ndarray, np.ndarray | None]]) -> tuple[dict[int, Routed], int]:
    """{layer: its routed rows} by a plain loop over tokens and their top-k experts, one call per batch; the
    token count."""
    mods = experts_modules(hf_model)
    rows: dict[int, dict[int, list]] = {i: {} for i in mods}
    tokens = 0
    for k, (ids, mask) in enumerate(batches):
        m = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
        tokens += int(m.sum())
        for i, (h, idx, w) in capture_routing(hf_model, ids, mask).items():
            flat_m = m.reshape(-1)
            for t in range(h.shape[0]):
                if not flat_m[t]:
                    continue
                for j in range(idx.shape[1]):
                    e = int(idx[t, j])
                    rows[i].setdefault(e, []).append((expert_output(mods[i], e, h[t]), float(w[t, j]), k))
    out = {}
    for i, mod in mods.items():
        d = hf_model.config.hidden_size
        got = [rows[i].get(e, []) for e in range(mod.num_experts)]
        out[i] = Routed([np.array([r[0] for r in g]).reshape(len(g), d) for g in got],
                        [np.array([r[1] for r in g], np.float64) for g in got],
                        [np.array([r[2] for r in g], np.int64) for g in got], tokens)
    return out, tokens


# ------------------------------------------------------------------------------------ quantized weights


def blockwise_quantize(w: np.ndarray, block: tuple[int, int], kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block quantization of a [R, C] float weight, block by block (the last block of a dimension
    partial): ``kind`` "fp8" (float8_e4m3fn, float32 scales), "fp8-pow2" (power-of-two float8_e8m0fnu scales)
    or "int4" (int8 values in [-8, 7]). Returns (values, scales [ceil(R/b0), ceil(C/b1)])."""
    (R, C), (b0, b1) = w.shape, block
    gr, gc = -(-R // b0), -(-C // b1)
    q = np.zeros((R, C), np.int8 if kind == "int4" else ml_dtypes.float8_e4m3fn)
    scales = np.zeros((gr, gc), np.float32)
    for i in range(gr):
        for j in range(gc):
            blk = np.asarray(w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1], np.float32)
            amax = max(float(np.abs(blk).max()), 1e-6)
            s = amax / (7.0 if kind == "int4" else 448.0)
            if kind == "fp8-pow2":
                s = 2.0 ** np.ceil(np.log2(s))
            scales[i, j] = s
            scaled = blk / np.float32(s)
            q[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = (
                np.clip(np.round(scaled), -8, 7) if kind == "int4" else scaled).astype(q.dtype)
    return q, (scales.astype(ml_dtypes.float8_e8m0fnu) if kind == "fp8-pow2" else scales)


def blockwise_dequantize(q: np.ndarray, scales: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """float32 q[i, j] * scales[i // b0, j // b1], one block at a time (the last blocks partial)."""
    out = np.asarray(q).astype(np.float32)
    b0, b1 = block
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            out[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] *= np.float32(scales[i, j])
    return out
