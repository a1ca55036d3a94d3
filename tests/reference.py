"""Independent float64 NumPy references computed from transformers' own forward pass."""

from __future__ import annotations

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


def reference_stats(hf_model, batches: list[tuple[np.ndarray, np.ndarray | None]]) -> tuple[dict, int]:
    """Per-layer float64 statistics by a plain loop over tokens and their top-k experts."""
    mods = experts_modules(hf_model)
    acc: dict[int, dict[int, list]] = {i: {} for i in mods}
    wsum: dict[int, dict[int, float]] = {i: {} for i in mods}
    tokens = 0
    for ids, mask in batches:
        m = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
        tokens += int(m.sum())
        for i, (h, idx, w) in capture_routing(hf_model, ids, mask).items():
            flat_m = m.reshape(-1)
            for t in range(h.shape[0]):
                if not flat_m[t]:
                    continue
                for j in range(idx.shape[1]):
                    e = int(idx[t, j])
                    y = expert_output(mods[i], e, h[t])
                    acc[i].setdefault(e, []).append((y, float(w[t, j])))
                    wsum[i][e] = wsum[i].get(e, 0.0) + float(w[t, j])
    out = {}
    for i, mod in mods.items():
        E, d = mod.num_experts, hf_model.config.hidden_size
        count, mean, var = np.zeros(E, np.int64), np.zeros((E, d)), np.zeros((E, d))
        reap, man, msan, ws = np.zeros(E), np.zeros(E), np.zeros(E), np.zeros(E)
        for e, rows in acc[i].items():
            ys = np.stack([r[0] for r in rows])
            count[e] = len(rows)
            mean[e] = ys.mean(0)
            var[e] = ys.var(0, ddof=1) if len(rows) > 1 else 0.0
            reap[e] = np.mean([r[1] * np.linalg.norm(r[0]) for r in rows])
            man[e] = np.mean([np.linalg.norm(r[0]) for r in rows])
            msan[e] = np.mean([np.linalg.norm(r[0]) ** 2 for r in rows])
            ws[e] = wsum[i][e]
        out[i] = dict(count=count, weight_sum=ws, mean=mean, var=var, reap=reap, man=man, msan=msan)
    return out, tokens
