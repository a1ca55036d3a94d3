"""The text model of a multimodal checkpoint, as mone-jax sees it.

Vision towers are out of scope: for a model type listed here, ``read_config`` gives the text model's
config (``text_config``) and ``CheckpointReader`` shows only the language model's tensors, renamed to a
causal LM's names (``model.language_model.layers.0...`` -> ``model.layers.0...``). Everything downstream
(loading, calibration, ``inspect``, export) then works on the text model, and an export is a text-only
checkpoint of the text model's type (Qwen3.5-MoE: ``qwen3_5_moe_text``, ``Qwen3_5MoeForCausalLM``).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TextModel:
    prefix: str  # on-disk prefix of the language model's tensors, replaced by "model."
    dropped: tuple[str, ...]  # on-disk prefixes of the towers left out


MULTIMODAL = {"qwen3_5_moe": TextModel("model.language_model.", ("model.visual.",))}
_TOP_LEVEL = ("tie_word_embeddings", "dtype", "torch_dtype")  # written beside text_config by multimodal configs


def text_model(raw: dict) -> TextModel | None:
    return MULTIMODAL.get(raw.get("model_type")) if isinstance(raw.get("text_config"), dict) else None


def text_config(raw: dict, folder: Path) -> dict:
    """``raw`` itself, or for a multimodal config its text model's config (top-level dtype and tied
    embeddings carried over; no architectures: they name the multimodal class)."""
    if text_model(raw) is None:
        return raw
    _note(folder, raw["model_type"])
    text = {k: v for k, v in raw["text_config"].items() if k != "architectures"}
    return {**text, **{k: raw[k] for k in _TOP_LEVEL if k in raw}}


def tensor_names(raw: dict, keys: list[str]) -> dict[str, str]:
    """{name as the text model's: name on disk} of the tensors of ``keys`` that the text model holds."""
    tm = text_model(raw)
    if tm is None:
        return {k: k for k in keys}
    out = {}
    for k in keys:
        if k.startswith(tm.dropped):
            continue
        out["model." + k[len(tm.prefix):] if k.startswith(tm.prefix) else k] = k
    return out


@functools.cache
def _note(folder: Path, model_type: str) -> None:
    warnings.warn(f"'{folder}' is a multimodal {model_type} checkpoint: only its text model is read (the vision "
                  "tower is ignored) and exports hold the text model only", stacklevel=4)
