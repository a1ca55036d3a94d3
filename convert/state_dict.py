"""Flax model -> Hugging Face tensors: the writing direction of :mod:`.load`, under the same family names.

``hf_state_dict(model)`` gives the model's own arrays under the family's on-disk names (torch
``[out, in]`` layout; per-expert keys, or GPT-OSS's fused interleaved stacks). A pruned MoE layer
yields its K retained experts at indices 0..K-1 (compact, ascending original id) and no novices:
the export formats (:mod:`.formats`) rename and add those. Of a model spread over several processes,
``hf_state_dict(model, share=True)`` gives what this process writes: the expert rows whose first replica its
devices hold, and on process 0 everything else (replicated: its own copy).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from mone_jax.convert.families import Family, family
from mone_jax.model.causal_lm import LAYER_NORMS, MLP, MoEBlock, MoEForCausalLM
from mone_jax.model.deltanet import DepthwiseConv
from mone_jax.model.layers import LayerNorm, Linear, RMSNorm


def host(a) -> np.ndarray:
    """``a`` on the host: a replicated array of several processes as this process's own copy."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        if not a.sharding.is_fully_replicated:
            raise ValueError("an array split over several processes has no whole host copy")
        a = a.addressable_data(0)
    return np.asarray(a)


def _np(var: nnx.Variable) -> np.ndarray:
    return host(var.get_value())


def owned_rows(var: nnx.Variable, n: int, share: bool) -> dict[int, np.ndarray]:
    """{row: stacked rows} of an expert stack's first ``n`` rows (the rest is padding): all of them, or with
    ``share`` those whose first replica (``replica_id`` 0) this process's devices hold, each row once over all
    processes."""
    a = var.get_value()
    if not share or not isinstance(a, jax.Array) or a.is_fully_addressable:
        return {0: np.asarray(a)[:n]}
    out = {}
    for s in a.addressable_shards:
        lo = s.index[0].indices(a.shape[0])[0]
        if s.replica_id == 0 and lo < n:
            out[lo] = np.asarray(s.data)[:n - lo]
    return out


def _t(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(a, -1, -2))


def _interleave(a: np.ndarray) -> np.ndarray:
    """[gate | up] halves -> GPT-OSS's interleaved gate/up columns (inverse of the loader's de-interleave)."""
    f = a.shape[-1] // 2
    out = np.empty_like(a)
    out[..., 0::2], out[..., 1::2] = a[..., :f], a[..., f:]
    return out


def _attention(attn: nnx.Module, p: str, names: Mapping[str, str]) -> dict[str, np.ndarray]:
    out = {}
    for name, mod in vars(attn).items():
        name = names.get(name, name)
        if isinstance(mod, Linear):
            out[f"{p}.{name}.weight"] = _t(_np(mod.kernel))
            if mod.bias is not None:
                out[f"{p}.{name}.bias"] = _np(mod.bias)
        elif isinstance(mod, (RMSNorm, DepthwiseConv)):
            out[f"{p}.{name}.weight"] = _np(mod.weight)
        elif isinstance(mod, nnx.Param):
            out[f"{p}.{name}"] = _np(mod)
    return out


def _norm(norm: RMSNorm | LayerNorm, p: str) -> dict[str, np.ndarray]:
    """A decoder norm's weight, and its bias when it is a LayerNorm."""
    out = {f"{p}.weight": _np(norm.weight)}
    if isinstance(norm, LayerNorm):
        out[f"{p}.bias"] = _np(norm.bias)
    return out


def _mlp(m: MLP, p: str, names=("gate_proj", "up_proj", "down_proj")) -> dict[str, np.ndarray]:
    gu = _np(m.gate_up)
    f = gu.shape[-1] // 2
    return {f"{p}.{names[0]}.weight": _t(gu[:, :f]), f"{p}.{names[1]}.weight": _t(gu[:, f:]),
            f"{p}.{names[2]}.weight": _t(_np(m.down))}


def _experts(fam: Family, blk: MoEBlock, layer: int, share: bool) -> dict[str, np.ndarray]:
    K = blk.num_kept
    if fam.fused_on_disk:  # one tensor per layer: a process cannot write its rows alone
        if share:
            raise ValueError("GPT-OSS stores each layer's experts as one tensor: it cannot be written in parts")
        gu, dn = _np(blk.gate_up)[:K], _np(blk.down)[:K]
        pre = f"{fam.moe_prefix(layer)}.experts"
        return {f"{pre}.gate_up_proj": _interleave(_t(gu)),
                f"{pre}.gate_up_proj_bias": _interleave(_np(blk.gate_up_bias)[:K]),
                f"{pre}.down_proj": _t(dn), f"{pre}.down_proj_bias": _np(blk.down_bias)[:K]}
    out = {}
    downs = owned_rows(blk.down, K, share)
    for lo, gu in owned_rows(blk.gate_up, K, share).items():  # as stored: [K, 2f, d], [K, d, f]
        f = gu.shape[1] // 2
        for j in range(gu.shape[0]):
            out[fam.expert_key(layer, lo + j, 0)] = gu[j, :f]
            out[fam.expert_key(layer, lo + j, 1)] = gu[j, f:]
            out[fam.expert_key(layer, lo + j, 2)] = downs[lo][j]
    return out


def _moe(fam: Family, blk: MoEBlock, layer: int) -> dict[str, np.ndarray]:
    """The router-side and shared-expert tensors of a MoE block (the routed experts: :func:`_experts`)."""
    out = {fam.router_key(layer): _t(_np(blk.router))}
    if blk.router_bias is not None:
        out[fam.router_key(layer, "bias")] = _np(blk.router_bias)
    if blk.score_bias is not None:
        out[fam.score_bias_key(layer)] = _np(blk.score_bias)[None] if fam.score_bias_2d else _np(blk.score_bias)
    if blk.shared is not None:
        out.update(_mlp(blk.shared, f"{fam.moe_prefix(layer)}.{fam.shared_expert}"))
        if blk.shared_gate is not None:
            out[f"{fam.moe_prefix(layer)}.{fam.shared_expert_gate}.weight"] = _t(_np(blk.shared_gate))
    return out


def hf_state_dict(model: MoEForCausalLM, share: bool = False) -> dict[str, np.ndarray]:
    """Every array of ``model`` under its Hugging Face name, or with ``share`` this process's part of them (see
    the module docstring)."""
    fam = family(model.config.model_type)
    rest = not share or jax.process_index() == 0  # this process writes the replicated tensors
    out = {}
    if rest:
        out = {"model.embed_tokens.weight": _np(model.embed), **_norm(model.norm, "model.norm")}
        if model.lm_head is not None:
            out["lm_head.weight"] = _t(_np(model.lm_head))
        if model.lm_head_bias is not None:
            out["lm_head.bias"] = _np(model.lm_head_bias)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}"
        if rest:
            for n in LAYER_NORMS:
                if getattr(layer, n) is not None:
                    out.update(_norm(getattr(layer, n), f"{p}.{n}"))
            out.update(_attention(layer.mixer, f"{p}.{layer.mixer_name}", fam.attn_names))
            out.update(_moe(fam, layer.mlp, i) if layer.is_moe else _mlp(layer.mlp, f"{p}.{fam.dense_mlp_module}"))
        if layer.is_moe:
            out.update(_experts(fam, layer.mlp, i, share))
    return out
