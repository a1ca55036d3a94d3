"""Hugging Face folder -> Flax NNX model, reading one tensor at a time.

Besides stock checkpoints this reads checkpoints whose routed experts were pruned to novices,
in the layouts of docs/formats.md (whoever wrote them: this project or the PyTorch
reference): ``substitution`` (config ``compression_config.transform_config.expert_substitution``,
retained experts at compact indices, ``<moe>.expert_replacements.<e>.value``) and ``modepd``
(config ``approximate_experts``, retained experts at their original indices,
``<moe>.experts.<e>.approx_value``). Either gives a pruned :class:`MoEForCausalLM`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from mone_jax.base.config import ModelConfig
from mone_jax.base.errors import UserError
from mone_jax.convert.families import Family, family, parse_config
from mone_jax.convert.formats import read_novices
from mone_jax.convert.quant import quant_method
from mone_jax.convert.reader import CheckpointReader, read_config
from mone_jax.model.causal_lm import LAYER_NORMS, MLP, DecoderLayer, MoEBlock, MoEForCausalLM
from mone_jax.model.deltanet import DepthwiseConv
from mone_jax.model.layers import LayerNorm, Linear, RMSNorm
from mone_jax.model.sharding import padded_state, param_specs, place

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


class _Filler:
    """Assigns checkpoint tensors to the Variables of an abstract (eval_shape) module."""

    def __init__(self, reader: CheckpointReader):
        self.r = reader

    def set(self, var: nnx.Variable, arr: np.ndarray, key: str) -> None:
        """``var`` := arr in var's declared dtype (float32 for routers kept in float32)."""
        want = var.get_value()
        if tuple(arr.shape) != tuple(want.shape):
            raise UserError(
                f"tensor '{key}' gives shape {list(arr.shape)} but config.json implies {list(want.shape)}: "
                "the weights do not belong to this config"
            )
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.kind != "V":
            arr = arr.astype(np.float32)
        var.set_value(jnp.asarray(arr, want.dtype))

    def t(self, var: nnx.Variable, key: str) -> None:
        """Linear weight [out, in] -> kernel [in, out]."""
        self.set(var, self.r.get(key).T, key)

    def plain(self, var: nnx.Variable, key: str) -> None:
        self.set(var, self.r.get(key), key)


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
    g, u, d = (f.r.get(f"{p}.{n}.weight") for n in names)
    f.set(m.gate_up, np.concatenate([g.T, u.T], axis=1), f"{p}.{names[0]}.weight")
    f.set(m.down, d.T, f"{p}.{names[2]}.weight")


def _stored_rows(f: _Filler, key: str, kept: list[int], num_experts: int) -> list[int]:
    """Rows of the retained experts in a fused [E or K, ...] stack (pruned exports keep K rows)."""
    n = f.r.shape(key)[0]
    if n == len(kept):
        return list(range(n))
    if n == num_experts:
        return kept
    raise UserError(f"'{key}' has {n} expert rows, expected {num_experts} (all) or {len(kept)} (retained)")


def _fused_rows(f: _Filler, key: str, kept: list[int], num_experts: int) -> np.ndarray:
    return f.r.get_slice(key, np.asarray(_stored_rows(f, key, kept, num_experts)))


def _gpt_oss_weight(f: _Filler, key: str, kept: list[int], num_experts: int, dtype) -> np.ndarray:
    """Retained experts' [K, in, out] GPT-OSS weight ``key`` (MXFP4 dequantized by the reader), one expert at
    a time in ``dtype``."""
    return np.stack([f.r.get_slice(key, r).astype(dtype) for r in _stored_rows(f, key, kept, num_experts)])


def _deinterleave(a: np.ndarray) -> np.ndarray:
    """GPT-OSS fused [..., 2f] with gate/up interleaved -> [gate | up] halves."""
    return np.concatenate([a[..., 0::2], a[..., 1::2]], axis=-1)


def expert_weights(reader: CheckpointReader, fam: Family, layer: int, kept: list[int], disk: list[int],
                   num_experts: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Weights of the routed experts ``kept`` (original ids; ``disk``: their on-disk indices) of ``layer``, as
    the model holds them: gate_up [K, d, 2f] (gate half, then up half) and down [K, f, d]; quantized experts
    dequantized to ``dtype``, others in their stored dtype. Biases are not part of them."""
    f, pre = _Filler(reader), f"{fam.moe_prefix(layer)}.experts"
    if fam.fused_on_disk:  # GPT-OSS: gate_up [E, d, 2f] interleaved, down [E, f, d]; maybe MXFP4
        return (_deinterleave(_gpt_oss_weight(f, f"{pre}.gate_up_proj", kept, num_experts, dtype)),
                _gpt_oss_weight(f, f"{pre}.down_proj", kept, num_experts, dtype))
    if f"{pre}.gate_up_proj" in reader:  # transformers' in-memory layout: gate_up [E, 2f, d], down [E, d, f]
        return tuple(_fused_rows(f, f"{pre}.{n}", kept, num_experts).transpose(0, 2, 1)
                     for n in ("gate_up_proj", "down_proj"))
    def w(e: int, which: int) -> np.ndarray:  # a quantized expert is dequantized, and cast, one at a time
        key = fam.expert_key(layer, e, which)
        return reader.get(key).astype(dtype) if reader.quantized(key) else reader.get(key)

    gu = np.stack([np.concatenate([w(e, 0).T, w(e, 1).T], 1) for e in disk])
    return gu, np.stack([w(e, 2).T for e in disk])


def _experts(f: _Filler, fam: Family, blk: MoEBlock, layer: int, kept: list[int], disk: list[int]) -> None:
    """Retained experts ``kept`` (original ids) stored at on-disk indices ``disk`` into blk's [K, ...] stacks."""
    pre = f"{fam.moe_prefix(layer)}.experts"
    E = blk.cfg.num_experts
    gu, dn = expert_weights(f.r, fam, layer, kept, disk, E, np.dtype(blk.gate_up.get_value().dtype))
    fused = fam.fused_on_disk or f"{pre}.gate_up_proj" in f.r
    f.set(blk.gate_up, gu, f"{pre}.gate_up_proj" if fused else fam.expert_key(layer, disk[0], 0))
    f.set(blk.down, dn, f"{pre}.down_proj" if fused else fam.expert_key(layer, disk[0], 2))
    if fam.fused_on_disk:  # GPT-OSS biases, gate/up interleaved like the weight
        f.set(blk.gate_up_bias, _deinterleave(_fused_rows(f, f"{pre}.gate_up_proj_bias", kept, E)),
              f"{pre}.gate_up_proj_bias")
        f.set(blk.down_bias, _fused_rows(f, f"{pre}.down_proj_bias", kept, E), f"{pre}.down_proj_bias")


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
    blk.kept_ids.set_value(jnp.asarray(kept, jnp.int32))
    nov = sorted(novices)
    blk.novice_ids.set_value(jnp.asarray(nov, jnp.int32).reshape(len(nov)))
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


def load_layer(reader: CheckpointReader, cfg: ModelConfig, layer_index: int, dtype="float32") -> DecoderLayer:
    """Decoder layer ``layer_index`` read from ``reader`` (pruned if the config says so)."""
    dt = resolve_dtype(dtype)
    raw = read_config(reader.folder)
    check_quantization(raw, cfg)
    if not 0 <= layer_index < cfg.num_layers:
        raise UserError(f"layer {layer_index} does not exist: the model has {cfg.num_layers} layers")
    layout = pruned_layout(raw, cfg)
    kept = len(layout.kept(layer_index, cfg.num_experts)) if layout and layout.novices.get(layer_index) else None
    layer = nnx.eval_shape(lambda: DecoderLayer(cfg, layer_index, dt, nnx.Rngs(0), kept))
    _fill_layer(_Filler(reader), family(cfg.model_type), layer, layer_index, layout)
    _check_filled(layer)
    return layer


def load_embed_and_head(reader: CheckpointReader, cfg: ModelConfig, dtype="float32") -> dict[str, jax.Array | None]:
    """``{"embed": [vocab, d], "norm": [d] (final norm weight), "lm_head": [d, vocab] or None when tied,
    "norm_bias": [d] and "lm_head_bias": [vocab] or None where the family has none}``."""
    dt = resolve_dtype(dtype)
    check_quantization(read_config(reader.folder), cfg)
    d, V = cfg.hidden_size, cfg.vocab_size
    out = {"embed": reader.get("model.embed_tokens.weight", (V, d)), "norm": reader.get("model.norm.weight", (d,)),
           "lm_head": None if cfg.tie_word_embeddings else reader.get("lm_head.weight", (V, d)).T,
           "norm_bias": reader.get("model.norm.bias", (d,)) if cfg.layer_norm else None,
           "lm_head_bias": reader.get("lm_head.bias", (V,)) if cfg.lm_head_bias else None}
    return {k: None if v is None else jnp.asarray(v if v.dtype.kind in "fV" else v.astype(np.float32), dt)
            for k, v in out.items()}


def load_hf(folder: str | Path, dtype="float32", *, mesh: Mesh | None = None, progress: bool = True) -> MoEForCausalLM:
    """Load a Hugging Face MoE checkpoint folder (safetensors) as a Flax NNX model.

    A folder pruned in any export format loads as a pruned model (its novices and retained experts
    in place), so it can be checked against its PyTorch logits. With ``mesh`` each layer is placed on
    the mesh (experts split over its ``expert`` axis) before the next one is read, and the files are
    reopened per layer, so no host or device holds more than one layer beyond its share of the model.
    """
    cfg = parse_config(read_config(folder))
    dt = resolve_dtype(dtype)
    model = nnx.eval_shape(lambda: MoEForCausalLM(cfg, dt, rngs=nnx.Rngs(0), kept=kept_counts(folder)))

    def put(module: nnx.Module) -> None:
        if mesh is not None:  # expert stacks padded to a multiple of the expert axis with inert rows
            state = padded_state(nnx.state(module), mesh)
            nnx.update(module, place(state, param_specs(state), mesh))

    with CheckpointReader(folder) as r:
        head = load_embed_and_head(r, cfg, dt)
    for var, key in ((model.embed, "embed"), (model.norm.weight, "norm"), (model.lm_head, "lm_head"),
                     (getattr(model.norm, "bias", None), "norm_bias"), (model.lm_head_bias, "lm_head_bias")):
        if var is not None:
            var.set_value(head[key] if mesh is None else place(head[key], P(), mesh))
    for i in tqdm(range(cfg.num_layers), desc="loading layers", disable=not progress, leave=False):
        with CheckpointReader(folder) as r:  # reopened per layer: the file pages read leave memory
            layer = load_layer(r, cfg, i, dt)
        put(layer)
        model.layers[i] = layer
    _check_filled(model)
    return model


def _check_filled(module: nnx.Module) -> None:
    for path, leaf in nnx.to_flat_state(nnx.state(module)):
        if isinstance(leaf.get_value(), jax.ShapeDtypeStruct):
            raise UserError(f"no checkpoint tensor was loaded for {'.'.join(map(str, path))}: missing tensors")


def config_of(folder: str | Path) -> ModelConfig:
    return parse_config(read_config(folder))
