"""Quantized checkpoints: one registry entry per scheme, and where a checkpoint's quantized tensors are.

A quantized tensor ``X`` (a Linear's ``X = <module>.weight``, or a GPT-OSS fused expert stack) is stored
as parts whose names are ``X`` plus a suffix (``X_scale_inv``, ``X_packed``, ``X_blocks`` ...). Which
tensors are quantized follows from ``quantization_config`` and the parts present beside them (a scale
beside a weight), never from module names. :class:`~mone_jax.convert.reader.CheckpointReader` shows each
one under its logical name ``X``, dequantized to float32 one tensor (or one expert row) at a time, and
keeps the stored parts readable so an export copies them byte for byte.

Formats (docs/formats.md): fine-grained FP8 (DeepSeek-V3's ``quant_method: fp8``, blocks of
``weight_block_size``, the last block of a dimension partial), compressed-tensors ``float-quantized`` and
``pack-quantized`` (llm-compressor; symmetric, tensor / channel / group / block scales) and GPT-OSS MXFP4.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from mone_jax.base.errors import UserError

Parts = dict[str, np.ndarray]  # role -> stored array


@dataclass(frozen=True)
class Scheme:
    """A stored form of quantized tensors: its config ``method`` (and compressed-tensors ``format``), the
    part that marks a tensor as quantized, the suffix of each part, and how the parts become float32."""

    name: str
    method: str  # quantization_config.quant_method
    fmt: str | None  # compressed-tensors format ("float-quantized" | "pack-quantized"), else None
    marker: str  # regex over stored names: group 1 is the logical name of a quantized tensor
    parts: dict[str, str]  # role -> suffix appended to the logical name ("" = the logical name itself)
    dequantize: Callable[[Parts, dict], np.ndarray]  # (parts, args) -> float32
    exclude_key: str  # config key that lists modules left unquantized


@dataclass(frozen=True)
class QuantTensor:
    """One quantized tensor of a checkpoint: its scheme, stored part names, logical shape, scheme arguments."""

    scheme: Scheme
    parts: dict[str, str]  # role -> stored tensor name
    shape: tuple[int, ...]
    args: dict = field(default_factory=dict)

    def dequantize(self, parts: Parts) -> np.ndarray:
        return self.scheme.dequantize(parts, self.args)


# ------------------------------------------------------------------------------------------- dequantizers


def scale_blocks(w: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """``w`` [..., R, C] float32 times, in place, a [..., ceil(R/b0), ceil(C/b1)] scale grid: w[i, j] *=
    scale[i // b0, j // b1], so the last block of a dimension that is not a multiple of its block is partial."""
    (b0, b1), C = block, w.shape[-1]
    rows = np.repeat(np.asarray(scale, np.float32), b0, axis=-2)[..., : w.shape[-2], :]  # [..., R, grid columns]
    full = C // b1 * b1
    if full:
        w[..., :full].reshape(*w.shape[:-1], C // b1, b1)[...] *= rows[..., : C // b1, None]
    if full < C:
        w[..., full:] *= rows[..., -1:]
    return w


_F8_TABLES: dict[np.dtype, tuple[np.ndarray, np.ndarray]] = {}


def to_float32(a: np.ndarray) -> np.ndarray:
    """``a`` as float32; one-byte floats two at a time through a 65536-entry table of float32 pairs (exact,
    and several times faster than ml_dtypes' cast)."""
    if a.dtype.itemsize != 1 or a.dtype.kind != "V" or a.ndim == 0:
        return a.astype(np.float32)
    if a.dtype not in _F8_TABLES:  # pairs: entry k holds the two bytes of uint16 k, in memory order
        single = np.arange(256, dtype=np.uint8).view(a.dtype).astype(np.float32)
        _F8_TABLES[a.dtype] = single, single[np.arange(65536, dtype=np.uint16).view(np.uint8)].view(np.uint64)
    single, pairs = _F8_TABLES[a.dtype]
    a = np.ascontiguousarray(a)
    if a.shape[-1] % 2:
        return np.take(single, a.view(np.uint8))
    return np.take(pairs, a.view(np.uint16)).view(np.float32)


def _scaled(parts: Parts, args: dict) -> np.ndarray:
    w = to_float32(parts["weight"])
    return scale_blocks(w, parts["scale"].reshape(*w.shape[:-2], *args["grid"][-2:]), args["block"])


def unpack_int32(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Signed ``bits``-bit integers packed densely into int32 words along the last axis (element i at bit
    i * bits of the little-endian stream, stored with an offset of 2^(bits-1)) -> float32 [..., cols]."""
    words = np.ascontiguousarray(packed, "<i4").view("<u4")
    if 32 % bits == 0:  # whole values per word: shift and mask
        shifts = np.arange(0, 32, bits, dtype=np.uint32)
        vals = ((words[..., None] >> shifts) & np.uint32((1 << bits) - 1)).reshape(*words.shape[:-1], -1)
    else:  # values straddle words: the little-endian bit stream
        stream = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
        vals = (stream[..., : cols * bits].reshape(*words.shape[:-1], cols, bits)
                * (1 << np.arange(bits, dtype=np.uint16))).sum(-1, dtype=np.uint16)
    return vals[..., :cols].astype(np.float32) - np.float32(1 << (bits - 1))


def _packed(parts: Parts, args: dict) -> np.ndarray:
    q = unpack_int32(parts["packed"], args["bits"], args["cols"])
    return scale_blocks(q, parts["scale"].reshape(*q.shape[:-2], *args["grid"][-2:]), args["block"])


_FP4_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def mxfp4_dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 -> float32: ``blocks`` [..., R, G, 16] uint8 (two e2m1 values per byte, low nibble first),
    ``scales`` [..., R, G] uint8 (power-of-two exponents, bias 127) -> [..., G * 32, R] (transposed, as
    GPT-OSS bf16 checkpoints store the weight)."""
    vals = np.stack([_FP4_E2M1[blocks & 0x0F], _FP4_E2M1[blocks >> 4]], axis=-1)
    vals = np.ldexp(vals.reshape(*blocks.shape[:-1], -1), scales.astype(np.int32)[..., None] - 127)
    return vals.reshape(*blocks.shape[:-2], -1).swapaxes(-1, -2)


SCHEMES: dict[str, Scheme] = {s.name: s for s in [
    Scheme("fp8-block", "fp8", None, r"(.+)_scale_inv", {"weight": "", "scale": "_scale_inv"}, _scaled,
           "modules_to_not_convert"),
    Scheme("ct-float", "compressed-tensors", "float-quantized", r"(.+\.weight)_scale",
           {"weight": "", "scale": "_scale"}, _scaled, "ignore"),
    Scheme("ct-pack", "compressed-tensors", "pack-quantized", r"(.+\.weight)_packed",
           {"packed": "_packed", "scale": "_scale", "shape": "_shape"}, _packed, "ignore"),
    Scheme("mxfp4", "mxfp4", None, r"(.+)_blocks", {"blocks": "_blocks", "scales": "_scales"},
           lambda p, a: mxfp4_dequantize(p["blocks"], p["scales"]), "modules_to_not_convert"),
]}
METHODS = sorted({s.method for s in SCHEMES.values()})
SUPPORTED = "fp8 (fine-grained blocks), compressed-tensors (float-quantized FP8, pack-quantized INT) and mxfp4 (GPT-OSS)"


def quant_method(raw: dict) -> str | None:
    """``quantization_config.quant_method`` of config.json ``raw`` (None: unquantized); UserError for methods
    no scheme reads."""
    q = raw.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict):
        raise UserError(f"config.json has a malformed quantization_config ({q!r}): repair or re-download it")
    method = q.get("quant_method")
    if method not in METHODS:
        raise UserError(f"quantized checkpoints ({method}) are not supported: mone-jax reads {SUPPORTED}; "
                        "use such a release or the unquantized one")
    return method


def exclude_key(raw: dict) -> str | None:
    """The config key under ``quantization_config`` listing unquantized modules (None: not quantized)."""
    method = quant_method(raw)
    return None if method is None else next(s.exclude_key for s in SCHEMES.values() if s.method == method)


# ----------------------------------------------------------------------------------------------- finding


class StoredInfo(Protocol):
    """What the finder needs of the stored tensors: names, shapes, dtypes and small reads."""

    def keys(self) -> Iterable[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> np.dtype: ...
    def get(self, key: str) -> np.ndarray: ...


def find_quantized(raw: dict, stored: StoredInfo) -> dict[str, QuantTensor]:
    """{logical name: QuantTensor} of a checkpoint (config.json ``raw``, tensors ``stored``); UserError where the
    tensors and the config disagree (a float8 weight without its scale, a quantized module the config excludes)."""
    method = quant_method(raw)
    keys = sorted(stored.keys())
    found: dict[str, QuantTensor] = {}
    for scheme in (s for s in SCHEMES.values() if s.method == method):
        marker, present = re.compile(scheme.marker), set(keys)
        for key in keys:
            if (m := marker.fullmatch(key)) is None or m[1] in found or ("" in scheme.parts.values()
                                                                         and m[1] not in present):
                continue  # a scale beside no tensor of its stem marks nothing
            parts = {role: m[1] + suffix for role, suffix in scheme.parts.items()}
            if lost := [p for p in parts.values() if p not in present]:
                raise UserError(f"quantized tensor '{m[1]}' lacks '{lost[0]}' beside '{key}': the "
                                "checkpoint is incomplete; re-download it")
            found[m[1]] = _tensor(scheme, raw["quantization_config"], m[1], parts, stored)
    used = {p for t in found.values() for p in t.parts.values()}
    for key in keys:
        if key not in used and (dt := np.dtype(stored.dtype(key))).itemsize == 1 and dt.kind == "V":
            raise UserError(f"tensor '{key}' is stored in {dt.name} without the scales of a quantization scheme "
                            f"mone-jax reads ({SUPPORTED}): the checkpoint's quantization_config does not describe it")
    return found


def _tensor(scheme: Scheme, q: dict, logical: str, parts: dict[str, str], stored: StoredInfo) -> QuantTensor:
    module = logical.removesuffix(".weight")
    if scheme.name == "mxfp4":
        *lead, rows, groups, _ = stored.shape(parts["blocks"])
        return QuantTensor(scheme, parts, (*lead, groups * 32, rows))
    if scheme.name == "fp8-block":
        _excluded_but_quantized(q.get("modules_to_not_convert") or [], module, logical)
        shape = stored.shape(parts["weight"])
        block = q.get("weight_block_size") or shape[-2:]
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise UserError(f"quantization_config weight_block_size {block!r} is not two positive integers: repair it")
        return _checked(QuantTensor(scheme, parts, shape, {"block": tuple(block)}), stored)
    args = _ct_weights(q, module, logical, scheme)
    if scheme.name == "ct-pack":
        shape = tuple(int(d) for d in stored.get(parts["shape"]).reshape(-1))
        if args["type"] != "int" or not 1 <= args["bits"] <= 8:
            raise UserError(f"'{logical}': pack-quantized {args['type']} with {args['bits']} bits is not supported "
                            "(only int, 1 to 8 bits)")
        packed = stored.shape(parts["packed"])
        if packed != (*shape[:-1], math.ceil(shape[-1] * args["bits"] / 32)):
            raise UserError(f"'{parts['packed']}' has shape {list(packed)}, which does not pack weight_shape "
                            f"{list(shape)} at {args['bits']} bits: the checkpoint is corrupt")
        args = {**args, "cols": shape[-1]}
    else:
        shape = stored.shape(parts["weight"])
    return _checked(QuantTensor(scheme, parts, shape, {**args, "block": _ct_block(args, shape, logical)}), stored)


def _checked(t: QuantTensor, stored: StoredInfo) -> QuantTensor:
    """``t`` with its scale grid ``args["grid"]``, after checking that the stored scale has that many entries."""
    b0, b1 = t.args["block"]
    grid = (*t.shape[:-2], math.ceil(t.shape[-2] / b0), math.ceil(t.shape[-1] / b1))
    scale = stored.shape(t.parts["scale"])
    if math.prod(scale) != math.prod(grid) or (len(scale) == len(grid) and tuple(scale) != grid):
        raise UserError(f"'{t.parts['scale']}' has shape {list(scale)} but a {list(t.shape)} weight in blocks of "
                        f"{b0} x {b1} needs {list(grid)}: the checkpoint does not match its quantization_config")
    return QuantTensor(t.scheme, t.parts, t.shape, {**t.args, "grid": grid})


def _excluded_but_quantized(excluded: list, module: str, logical: str) -> None:
    if excluded and any(_matches(str(p), module) for p in excluded):
        raise UserError(f"'{logical}' is quantized but quantization_config excludes module '{module}': "
                        "the checkpoint does not match its config")


def _matches(pattern: str, module: str) -> bool:
    """A compressed-tensors / transformers module pattern: ``re:REGEX`` (searched from the start), a class
    name (``Linear``: every quantized tensor is a Linear's), an exact name or a trailing dotted name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return pattern == "Linear" or module == pattern or module.endswith("." + pattern)


def _ct_weights(q: dict, module: str, logical: str, scheme: Scheme) -> dict:
    """The compressed-tensors weight arguments of ``module``: its config group's ``weights`` (ignore list and
    format checked)."""
    _excluded_but_quantized(q.get("ignore") or [], module, logical)
    groups = [g for g in (q.get("config_groups") or {}).values()
              if isinstance(g, dict) and any(_matches(str(t), module) for t in g.get("targets") or [])]
    if not groups or not isinstance(groups[0].get("weights"), dict):
        raise UserError(f"'{logical}' is quantized but no config_groups entry of quantization_config targets "
                        f"'{module}': the checkpoint does not match its config")
    fmt = groups[0].get("format") or q.get("format")
    if fmt != scheme.fmt:
        raise UserError(f"'{logical}' is stored {scheme.fmt} but quantization_config says format '{fmt}': "
                        "the checkpoint does not match its config")
    w = groups[0]["weights"]
    if not w.get("symmetric", True):
        raise UserError(f"'{logical}': asymmetric compressed-tensors weights (zero points) are not supported")
    return {"type": w.get("type", "int"), "bits": int(w.get("num_bits", 8)), "strategy": w.get("strategy"),
            "group_size": w.get("group_size"), "block_structure": w.get("block_structure")}


def _ct_block(args: dict, shape: tuple[int, ...], logical: str) -> tuple[int, int]:
    strategy = args["strategy"]
    if strategy == "tensor":
        return shape[-2], shape[-1]
    if strategy == "channel":
        return 1, shape[-1]
    if strategy == "group" and args["group_size"]:
        return 1, int(args["group_size"])
    if strategy == "block" and args["block_structure"]:
        return tuple(int(b) for b in args["block_structure"])
    raise UserError(f"'{logical}': compressed-tensors strategy '{strategy}' is not supported "
                    "(tensor, channel, group or block)")
