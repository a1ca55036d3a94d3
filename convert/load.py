"""Hugging Face folder -> Flax NNX model, reading one tensor at a time."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from convert.families import FamilyNames, family
from convert.reader import CheckpointReader, read_config
from mone_jax.config import ModelConfig, parse_config
from mone_jax.errors import UserError
from mone_jax.model import MLP, Attention, MoEBlock, MoEForCausalLM

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"dtype '{dtype}' is not supported: use one of {', '.join(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


class _Filler:
    """Assigns checkpoint tensors to the Variables of an abstract (eval_shape) model."""

    def __init__(self, reader: CheckpointReader, dtype):
        self.r, self.dtype = reader, dtype

    def set(self, var: nnx.Variable, arr: np.ndarray, key: str) -> None:
        want = tuple(var.get_value().shape)
        if tuple(arr.shape) != want:
            raise UserError(
                f"tensor '{key}' gives shape {list(arr.shape)} but config.json implies {list(want)}: "
                "the weights do not belong to this config"
            )
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.kind != "V":
            arr = arr.astype(np.float32)
        var.set_value(jnp.asarray(arr, self.dtype))

    def t(self, var: nnx.Variable, key: str) -> None:
        """Linear weight [out, in] -> kernel [in, out]."""
        self.set(var, self.r.get(key).T, key)

    def plain(self, var: nnx.Variable, key: str) -> None:
        self.set(var, self.r.get(key), key)


def _attention(f: _Filler, a: Attention, p: str) -> None:
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        lin = getattr(a, name)
        f.t(lin.kernel, f"{p}.{name}.weight")
        if lin.bias is not None:
            f.plain(lin.bias, f"{p}.{name}.bias")
    if a.q_norm is not None:
        f.plain(a.q_norm.weight, f"{p}.q_norm.weight")
        f.plain(a.k_norm.weight, f"{p}.k_norm.weight")


def _mlp(f: _Filler, m: MLP, p: str, names=("gate_proj", "up_proj", "down_proj")) -> None:
    g, u, d = (f.r.get(f"{p}.{n}.weight") for n in names)
    f.set(m.gate_up, np.concatenate([g.T, u.T], axis=1), f"{p}.{names[0]}.weight")
    f.set(m.down, d.T, f"{p}.{names[2]}.weight")


def _experts(f: _Filler, fam: FamilyNames, blk: MoEBlock, layer: int, ids: list[int]) -> None:
    """Routed experts ``ids`` (original numbering, on-disk index) into blk's [K, ...] stacks."""
    pre = f"{fam.moe_prefix(layer)}.experts"
    if f"{pre}.gate_up_proj" in f.r:  # fused on disk: gate_up [E, 2f, d], down [E, d, f]
        gu = np.stack([f.r.get_slice(f"{pre}.gate_up_proj", e) for e in ids])
        dn = np.stack([f.r.get_slice(f"{pre}.down_proj", e) for e in ids])
        f.set(blk.gate_up, gu.transpose(0, 2, 1), f"{pre}.gate_up_proj")
        f.set(blk.down, dn.transpose(0, 2, 1), f"{pre}.down_proj")
        return
    gu = np.stack([np.concatenate([f.r.get(fam.expert_key(layer, e, 0)).T, f.r.get(fam.expert_key(layer, e, 1)).T], 1)
                   for e in ids])
    f.set(blk.gate_up, gu, fam.expert_key(layer, ids[0], 0))
    dn = np.stack([f.r.get(fam.expert_key(layer, e, 2)).T for e in ids])
    f.set(blk.down, dn, fam.expert_key(layer, ids[0], 2))


def _moe(f: _Filler, fam: FamilyNames, blk: MoEBlock, layer: int) -> None:
    pre = fam.moe_prefix(layer)
    f.t(blk.router, fam.router_key(layer))
    _experts(f, fam, blk, layer, list(range(blk.num_kept)))
    blk.kept_ids.set_value(jnp.arange(blk.num_kept, dtype=jnp.int32))
    blk.novice_ids.set_value(jnp.zeros((0,), jnp.int32))
    blk.novice_values.set_value(jnp.zeros((0, blk.cfg.hidden_size), f.dtype))
    if blk.shared is not None:
        _mlp(f, blk.shared, f"{pre}.{fam.shared_expert}")
        if blk.shared_gate is not None:
            f.t(blk.shared_gate, f"{pre}.{fam.shared_expert_gate}.weight")


def load_hf(folder: str | Path, dtype="float32", *, progress: bool = True) -> MoEForCausalLM:
    """Load a Hugging Face MoE checkpoint folder (safetensors) as a Flax NNX model."""
    raw = read_config(folder)
    cfg = parse_config(raw)
    dt = resolve_dtype(dtype)
    fam = family(cfg.model_type)
    src = str(Path(folder).resolve())
    model = nnx.eval_shape(lambda: MoEForCausalLM(cfg, dt, rngs=nnx.Rngs(0), source_dir=src))
    with CheckpointReader(folder) as r:
        f = _Filler(r, dt)
        f.plain(model.embed, "model.embed_tokens.weight")
        f.plain(model.norm.weight, "model.norm.weight")
        if model.lm_head is not None:
            f.t(model.lm_head, "lm_head.weight")
        for i, layer in enumerate(tqdm(model.layers, desc="loading layers", disable=not progress, leave=False)):
            p = f"model.layers.{i}"
            f.plain(layer.input_layernorm.weight, f"{p}.input_layernorm.weight")
            f.plain(layer.post_attention_layernorm.weight, f"{p}.post_attention_layernorm.weight")
            _attention(f, layer.self_attn, f"{p}.self_attn")
            if layer.is_moe:
                _moe(f, fam, layer.mlp, i)
            else:
                _mlp(f, layer.mlp, f"{p}.{fam.dense_mlp_module}")
    _check_filled(model)
    return model


def _check_filled(model: MoEForCausalLM) -> None:
    import jax

    for path, leaf in nnx.to_flat_state(nnx.state(model)):
        if isinstance(leaf.get_value(), jax.ShapeDtypeStruct):
            raise UserError(f"no checkpoint tensor was loaded for {'.'.join(map(str, path))}: missing tensors")


def config_of(folder: str | Path) -> ModelConfig:
    return parse_config(read_config(folder))
