"""MoNE-pruned Mixture-of-Experts models for transformers (this file ships inside every export).

Load a ``substitution`` export with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``;
a ``modepd`` export ships no ``auto_map`` (as the reference's own checkpoints): load it with
``mone_jax.convert.modeling_mone.from_pretrained(folder)``.
The model is the family's stock transformers causal LM, except that each pruned experts module
holds only its K retained experts (stock fused weights, stock experts kernels) plus one
``[hidden]`` vector per novice. The router is untouched: it scores all E experts and picks the
same top-k; a token routed to a retained expert gets ``weight * expert(x)``, one routed to a
novice ``weight * value``, and the weights are not renormalised.

Two on-disk layouts are read:
- substitution: ``config.compression_config.transform_config.expert_substitution`` lists the
  targets; retained experts are stored with compact indices ``experts.<j>`` and novices as
  ``<moe>.expert_replacements.<e>.value``;
- modepd (the zxgx/mode-pd reference layout): ``config.approximate_experts`` {layer: [ids]},
  ``<family>_compressed`` model types, retained experts under their original ids and novices as
  ``<moe>.experts.<e>.approx_value``.

The experts modules keep the stock ``@use_experts_implementation`` dispatch, so
``model.set_experts_implementation("eager")`` works as for the stock model.
"""

from __future__ import annotations

import json
import os
import re

import torch
import transformers
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

COMPRESSED = "_compressed"


class NoviceValue(nn.Module):
    """One novice: a constant ``[hidden]`` output, stored as parameter ``value`` (or ``approx_value``)."""

    def __init__(self, hidden_size: int, name: str):
        super().__init__()
        self.param_name = name
        self.register_parameter(name, nn.Parameter(torch.zeros(hidden_size)))

    def vector(self) -> torch.Tensor:
        return getattr(self, self.param_name)


class _NoviceExperts:
    """Mixin over a stock experts class: K retained experts (compact) plus novices.

    Attributes set by ``_prune_experts``: ``mone_compact`` (CPU long [E]: compact index of each
    retained expert, -1 for novices), ``mone_novice_row`` (CPU long [E]: row of each novice in the
    value table, -1 for retained), and ``_mone_values`` (the NoviceValue modules, registered
    elsewhere; kept out of this module's state dict on purpose).
    """

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        compact = self.mone_compact.to(top_k_index.device)[top_k_index]
        kept = compact >= 0
        out = torch.zeros_like(hidden_states)
        tok, slot = kept.nonzero(as_tuple=True)
        if tok.numel():
            part = super().forward(hidden_states[tok], compact[tok, slot, None], top_k_weights[tok, slot, None])
            out.index_add_(0, tok, part.to(out.dtype))
        tok, slot = (~kept).nonzero(as_tuple=True)
        if tok.numel():
            table = torch.stack([m.vector() for m in self.__dict__["_mone_values"]])
            rows = self.mone_novice_row.to(top_k_index.device)[top_k_index[tok, slot]]
            out.index_add_(0, tok, (top_k_weights[tok, slot, None] * table[rows]).to(out.dtype))
        return out


_NOVICE_CLASSES: dict[type, type] = {}


def _prune_experts(experts: nn.Module, novices: list[int], values: list[NoviceValue]) -> None:
    """Turn a stock experts module (E experts) into one with the retained experts only."""
    n = experts.num_experts
    kept = sorted(set(range(n)) - set(novices))
    idx = torch.tensor(kept, device="cpu")
    for name, param in list(experts.named_parameters(recurse=False)):
        if param.shape[:1] == (n,):
            sliced = param.data[idx.to(param.device)] if not param.is_meta else param.data[: len(kept)]
            setattr(experts, name, nn.Parameter(sliced, requires_grad=param.requires_grad))
    stock = type(experts)
    if stock not in _NOVICE_CLASSES:
        _NOVICE_CLASSES[stock] = type(f"Novice{stock.__name__}", (_NoviceExperts, stock), {})
    experts.__class__ = _NOVICE_CLASSES[stock]
    experts.num_experts = len(kept)
    experts.mone_compact = torch.full((n,), -1, dtype=torch.long, device="cpu")
    experts.mone_compact[idx] = torch.arange(len(kept), device="cpu")
    experts.mone_novice_row = torch.full((n,), -1, dtype=torch.long, device="cpu")
    experts.mone_novice_row[torch.tensor(novices, device="cpu")] = torch.arange(len(novices), device="cpu")
    experts.__dict__["_mone_values"] = values


def novice_targets(config) -> dict[int, list[int]]:
    """{layer: novice expert ids} from an export's config (substitution block or mode-pd fields)."""
    block = ((getattr(config, "compression_config", None) or {}).get("transform_config") or {}).get(
        "expert_substitution"
    )
    if block:
        sem = block.get("router_semantics", {})
        if block.get("version") != 1 or sem.get("renormalize_after_substitution") or not sem.get(
            "preserve_logical_expert_ids", True
        ):
            raise ValueError(f"unsupported expert_substitution block: {block.get('version')=}, {sem=}")
        targets = {}
        for path, target in block["targets"].items():
            m = re.fullmatch(r"model\.layers\.(\d+)\.[a-z_]+\.experts", path)
            if not m or target.get("weight_layout") != "compact_retained_experts":
                raise ValueError(f"unsupported expert_substitution target {path!r}: {target.get('weight_layout')}")
            for e, rep in target["replacements"].items():
                want = f"{path.removesuffix('.experts')}.expert_replacements.{e}.value"
                if rep.get("format") != "constant-v1" or rep.get("tensors") != {"value": want}:
                    raise ValueError(f"unsupported replacement {e} of {path!r}: {rep}")
            targets[int(m[1])] = sorted(int(e) for e in target["replacements"])
        return targets
    approx = getattr(config, "approximate_experts", None) or {}
    return {int(layer): sorted(int(e) for e in ids) for layer, ids in approx.items()}


class _MoneCausalLM:
    """Mixin over a stock causal-LM class: prunes the experts modules named by the config."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        modepd = config.model_type.endswith(COMPRESSED)
        for layer, novices in novice_targets(config).items():
            if not novices:
                continue
            block = self.model.layers[layer].mlp
            experts = getattr(block, "experts", None)
            if experts is None or not hasattr(experts, "num_experts"):
                raise ValueError(f"layer {layer} has no routed experts, but the config prunes it")
            if modepd:
                values = [NoviceValue(config.hidden_size, "approx_value") for _ in novices]
                for e, v in zip(novices, values):
                    experts.add_module(str(e), v)
            else:
                values = [NoviceValue(config.hidden_size, "value") for _ in novices]
                block.expert_replacements = nn.ModuleDict({str(e): v for e, v in zip(novices, values)})
            _prune_experts(experts, novices, values)


def _family_of(stem: str) -> str:
    """The model_type whose stock causal LM is ``<stem>ForCausalLM``: its own config class's type (the auto
    mapping may also list a multimodal type for it, as for Qwen3.5-MoE), else the auto mapping's."""
    name = f"{stem}ForCausalLM"
    own = getattr(getattr(transformers, name, None), "config_class", None)
    types = [t for t, n in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if n == name]
    if not types:
        raise AttributeError(f"no transformers causal LM named {name}")
    return own.model_type if getattr(own, "model_type", None) in types else types[0]


def _compressed_config(model_type: str) -> type:
    """``<Stem>CompressedConfig``: the family's config class under the mode-pd model_type, whose checkpoints
    get the family's own checkpoint conversions."""
    stem = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type].removesuffix("ForCausalLM")
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # transformers without checkpoint conversions: nothing to register
        pass
    else:
        mapping = get_checkpoint_conversion_mapping(model_type)
        if mapping is not None:
            register_checkpoint_conversion_mapping(model_type + COMPRESSED, mapping, overwrite=True)
    return type(f"{stem}CompressedConfig", (CONFIG_MAPPING[model_type],),
                {"model_type": model_type + COMPRESSED, "__module__": __name__})


def __getattr__(name: str) -> type:
    """The auto_map targets, built on first use for any family transformers knows:
    ``Mone<Stem>ForCausalLM`` (substitution), ``<Stem>CompressedConfig`` and
    ``Mone<Stem>CompressedForCausalLM`` (mode-pd layout)."""
    if m := re.fullmatch(r"(\w+)CompressedConfig", name):
        cls = _compressed_config(_family_of(m[1]))
    elif m := re.fullmatch(r"Mone(\w+?)(Compressed)?ForCausalLM", name):
        model_type = _family_of(m[1])
        config_cls = CONFIG_MAPPING[model_type]
        if m[2]:
            config_cls = globals().get(f"{m[1]}CompressedConfig") or __getattr__(f"{m[1]}CompressedConfig")
        lm_cls = getattr(transformers, f"{m[1]}ForCausalLM")
        cls = type(name, (_MoneCausalLM, lm_cls), {"config_class": config_cls, "__module__": __name__})
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = cls  # built once: later lookups find the same class
    return cls


def from_pretrained(folder: str | os.PathLike, **kwargs):
    """The PyTorch model of an export in either layout, whether or not its config.json has an ``auto_map``
    (``modepd`` exports have none); ``kwargs`` go to ``from_pretrained`` (``dtype=...``)."""
    with open(os.path.join(folder, "config.json")) as f:
        model_type = json.load(f)["model_type"]
    base = model_type.removesuffix(COMPRESSED)
    stem = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base].removesuffix("ForCausalLM")
    suffix = "Compressed" if model_type.endswith(COMPRESSED) else ""
    name = f"Mone{stem}{suffix}ForCausalLM"
    return (globals().get(name) or __getattr__(name)).from_pretrained(folder, **kwargs)
