"""The export-format registry: how a pruned model is laid out in a Hugging Face folder, one record each.

A format declares its prune mode, how retained experts are numbered on disk, the tensor name of a
novice, the config fields it writes, whether it ships the PyTorch modeling file, how its config is
recognised again (``recognise``, ``read_novices``) and how transformers loads a folder of it
(``auto_loads``, ``load_code``). The writer (:mod:`.export`), the loader (:mod:`.load`), the model
card and the PyTorch comparisons only ask this table.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mone_jax.base.errors import UserError
from mone_jax.convert.families import COMPRESSED_SUFFIX, Family, num_experts_key
from mone_jax.convert.legacy_config import with_legacy_keys

MODELING = "modeling_mone.py"
# {layer: {expert: tensor key of its novice}} of a pruned checkpoint, as its config declares it
Novices = dict[int, dict[int, str]]


@dataclass(frozen=True)
class ExportFormat:
    name: str
    mode: str  # prune mode: "substitute" (novices) | "drop" (experts and router rows removed)
    compact: bool  # retained experts renumbered 0..K-1 on disk (else kept at their original ids)
    ships_modeling: bool  # bundles modeling_mone.py and points auto_map at it
    novice_key: Callable[[Family, int, int], str] | None  # (family, layer, expert) -> novice tensor name
    write_config: Callable[[dict, Family, dict[int, list[int]], list[int], int], dict]
    read_novices: Callable[[dict, Family], Novices | None]  # None: the config is not of this format
    recognise: Callable[[dict], bool]  # a config.json of this format (never for a stock checkpoint)
    auto_loads: bool  # AutoModelForCausalLM loads it (else modeling_mone.from_pretrained: no auto_map)
    load_code: str  # Python that loads a folder "{out}" of this format with transformers (the model card)

    def disk_index(self, kept: list[int], expert: int) -> int:
        """On-disk index of retained expert ``expert`` (original id) among ``kept`` (ascending)."""
        return kept.index(expert) if self.compact else expert


def _stem(model_type: str) -> str:
    """transformers' causal-LM class name of ``model_type`` without ``ForCausalLM`` (its auto mapping)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type].removesuffix("ForCausalLM")


# ------------------------------------------------------------------------------------------ substitution


def _substitution_key(fam: Family, layer: int, e: int) -> str:
    return f"{fam.moe_prefix(layer)}.expert_replacements.{e}.value"


def _substitution_config(cfg: dict, fam: Family, novices: dict[int, list[int]], moe_layers: list[int],
                         kept: int) -> dict:
    targets = {
        f"{fam.moe_prefix(layer)}.experts": {
            "num_logical_experts": cfg[num_experts_key(cfg, fam)],
            "weight_layout": "compact_retained_experts",
            "replacements": {str(e): {"format": "constant-v1", "tensors": {"value": _substitution_key(fam, layer, e)}}
                             for e in nov},
        }
        for layer, nov in novices.items() if nov
    }
    existing = cfg.get("compression_config")
    block = {"version": 1, "router_semantics": {"preserve_logical_expert_ids": True, "preserve_router_weights": True,
                                                "renormalize_after_substitution": False}, "targets": targets}
    return {**cfg, "compression_config": {**(existing if isinstance(existing, dict) else {}),
                                          "transform_config": {"expert_substitution": block}},
            "auto_map": {"AutoModelForCausalLM": f"modeling_mone.Mone{_stem(fam.model_type)}ForCausalLM"}}


def _substitution_block(raw: dict) -> dict | None:
    return ((raw.get("compression_config") or {}).get("transform_config") or {}).get("expert_substitution")


def _substitution_novices(raw: dict, fam: Family) -> Novices | None:
    block = _substitution_block(raw)
    if not block:
        return None
    sem = block.get("router_semantics") or {}
    if block.get("version") != 1 or not sem.get("preserve_logical_expert_ids", False) \
            or not sem.get("preserve_router_weights", False) or sem.get("renormalize_after_substitution", True):
        raise UserError(f"expert_substitution version {block.get('version')} with router_semantics {sem} is not "
                        "supported: only version 1 with preserved ids / router weights and no renormalisation")
    out = {}
    for path, target in (block.get("targets") or {}).items():
        m = re.fullmatch(rf"model\.layers\.(\d+)\.{re.escape(fam.moe_module)}\.experts", path)
        if not m or target.get("weight_layout") != "compact_retained_experts":
            raise UserError(f"expert_substitution target '{path}' is not supported: expected "
                            f"'model.layers.<l>.{fam.moe_module}.experts' with weight_layout compact_retained_experts")
        n = raw.get(num_experts_key(raw, fam))
        if target.get("num_logical_experts", n) != n:
            raise UserError(f"expert_substitution target '{path}' has {target.get('num_logical_experts')} logical "
                            f"experts but config.json says {n}: the config is inconsistent")
        values = {}
        for e, rep in (target.get("replacements") or {}).items():
            key = (rep.get("tensors") or {}).get("value")
            if not isinstance(key, str) or rep.get("format") != "constant-v1":
                raise UserError(f"replacement of expert {e} in '{path}' is not a constant-v1 value: "
                                "only constant (novice) replacements are supported")
            values[int(e)] = key
        out[int(m[1])] = values
    return out


# ------------------------------------------------------------------------------------------------ modepd


def _modepd_key(fam: Family, layer: int, e: int) -> str:
    return f"{fam.moe_prefix(layer)}.experts.{e}.approx_value"


def _modepd_config(cfg: dict, fam: Family, novices: dict[int, list[int]], moe_layers: list[int], kept: int) -> dict:
    """The reference's own config layout, readable by its transformers 4.x config classes (legacy keys), with
    no ``auto_map``: the reference strips it from its checkpoints and brings its own modeling code."""
    approx = {str(layer): novices.get(layer, []) for layer in moe_layers}
    return {**with_legacy_keys(cfg, fam), "model_type": fam.model_type + COMPRESSED_SUFFIX,
            "approximate_experts": approx,
            "approximate_expert_init_tokens": {layer: [0] * len(ids) for layer, ids in approx.items()}}


def _modepd_novices(raw: dict, fam: Family) -> Novices | None:
    if not raw.get("approximate_experts"):
        return None
    return {int(layer): {int(e): _modepd_key(fam, int(layer), int(e)) for e in ids}
            for layer, ids in raw["approximate_experts"].items()}


# -------------------------------------------------------------------------------------------------- drop


def _drop_config(cfg: dict, fam: Family, novices: dict[int, list[int]], moe_layers: list[int], kept: int) -> dict:
    return {**cfg, num_experts_key(cfg, fam): kept}


FORMATS: dict[str, ExportFormat] = {f.name: f for f in [
    ExportFormat("substitution", "substitute", compact=True, ships_modeling=True, novice_key=_substitution_key,
                 write_config=_substitution_config, read_novices=_substitution_novices,
                 recognise=lambda raw: bool(_substitution_block(raw)), auto_loads=True,
                 load_code='from transformers import AutoModelForCausalLM, AutoTokenizer\n'
                           'model = AutoModelForCausalLM.from_pretrained("{out}", trust_remote_code=True)  '
                           '# modeling_mone.py\n'
                           'tokenizer = AutoTokenizer.from_pretrained("{out}", trust_remote_code=True)'),
    ExportFormat("modepd", "substitute", compact=False, ships_modeling=False, novice_key=_modepd_key,
                 write_config=_modepd_config, read_novices=_modepd_novices,
                 recognise=lambda raw: str(raw.get("model_type", "")).endswith(COMPRESSED_SUFFIX), auto_loads=False,
                 load_code='from transformers import AutoTokenizer\n'
                           'from mone_jax.convert.modeling_mone import from_pretrained  '
                           '# no auto_map, as the reference\'s own\n'
                           'model = from_pretrained("{out}")\n'
                           'tokenizer = AutoTokenizer.from_pretrained("{out}")'),
    ExportFormat("drop", "drop", compact=True, ships_modeling=False, novice_key=None,
                 write_config=_drop_config, read_novices=lambda raw, fam: None,  # a stock checkpoint
                 recognise=lambda raw: False, auto_loads=True,
                 load_code='from transformers import AutoModelForCausalLM, AutoTokenizer\n'
                           'model = AutoModelForCausalLM.from_pretrained("{out}")  '
                           '# a stock checkpoint with fewer experts\n'
                           'tokenizer = AutoTokenizer.from_pretrained("{out}")'),
]}


def export_format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise UserError(f"unknown export format '{name}': use one of {', '.join(FORMATS)}")
    return FORMATS[name]


def read_novices(raw: dict, fam: Family) -> tuple[ExportFormat, Novices] | None:
    """The format and novice tensor keys a checkpoint's config declares; None for a stock checkpoint."""
    try:
        for fmt in FORMATS.values():
            if (found := fmt.read_novices(raw, fam)) is not None:
                return fmt, found
    except (AttributeError, TypeError, ValueError):
        raise UserError("config.json has a malformed 'compression_config' / 'approximate_experts' block: "
                        "re-export the pruned checkpoint") from None
    return None


def recognise(raw: dict) -> ExportFormat | None:
    """The export format a config.json declares; None for a stock checkpoint (an original or a drop export)."""
    return next((f for f in FORMATS.values() if f.recognise(raw)), None)


def torch_model(folder: str | Path, **kwargs):
    """The transformers model of a Hugging Face folder, original or any export format, loaded the way its format
    says (a bundled modeling file when its config names one); ``kwargs`` go to ``from_pretrained``."""
    raw = json.loads((Path(folder) / "config.json").read_text())
    f = recognise(raw)
    if f is not None and not f.auto_loads:
        from mone_jax.convert.modeling_mone import from_pretrained

        return from_pretrained(str(folder), **kwargs)
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code="auto_map" in raw,
                                                             **kwargs)
