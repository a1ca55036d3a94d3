"""Write pruned Hugging Face checkpoints: MoNE expert substitution, the reference (mode-pd) layout, or drop.

The source is read lazily (memory-mapped) and written tensor by tensor, so peak memory is one tensor.
Everything lands in a temporary sibling folder that is renamed into place only when complete; the
last file written is ``mone_manifest.json`` (sha256 and size of every other file), which
``verify_export`` checks. A later export to the same folder removes what killed runs left behind.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
from mone_jax.convert.families import COMPRESSED_SUFFIX, FamilyNames, family
from mone_jax.convert.reader import INDEX, SINGLE, CheckpointReader, read_config

from mone_jax.config import parse_config
from mone_jax.errors import UserError
from mone_jax.planning import LayerPlan, Plan

FORMATS = ("substitution", "modepd", "drop")
MANIFEST = "mone_manifest.json"
MODELING = "modeling_mone.py"
_HOST = socket.gethostname()  # temporary siblings are named .<out>.tmp-<host>-<pid>
_OUT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
_FLOATS = {np.dtype(t) for t in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16)}
_ST_NAME = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
    np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}
# Plain-data files copied verbatim (tokenizer_config.json is copied without any auto_map).
_COPIED = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "generation_config.json", "chat_template.jinja", "chat_template.json",
)
_COPIED_SUFFIXES = (".model", ".tiktoken")


@dataclass(frozen=True)
class _Tensor:
    """One output tensor: its name, shape, dtype and how to produce it."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def export_pruned(
    src_dir: str | Path,
    out_dir: str | Path,
    plan: Plan | dict,
    novices: dict[int, dict[int, np.ndarray]],
    *,
    fmt: str = "substitution",
    dtype: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
) -> dict:
    """Write the pruned checkpoint of ``src_dir`` to ``out_dir`` and return a summary dict.

    ``plan`` is a :class:`~mone_jax.planning.Plan` or its JSON dict (DESIGN.md section 3); ``novices[l][e]`` the [hidden] novice vector of
    each novice expert (unused for ``fmt="drop"``).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}': use one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in _OUT_DTYPES:
        raise UserError(f"unknown dtype '{dtype}': use one of {', '.join(_OUT_DTYPES)}")
    if max_shard_bytes <= 0:
        raise UserError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    src, out = Path(src_dir), Path(out_dir)
    cfg = read_config(src)
    model_type = str(cfg.get("model_type", ""))
    substituted = (cfg.get("compression_config") or {}).get("transform_config", {}).get("expert_substitution")
    if model_type.endswith(COMPRESSED_SUFFIX) or substituted:
        raise UserError(f"'{src}' is already a pruned checkpoint ({model_type}): export from the original model")
    try:
        fam = family(model_type)
    except ValueError as e:
        raise UserError(str(e)) from None
    if dtype is not None and cfg.get("quantization_config"):
        raise UserError(f"'{src}' is quantized: its dtype cannot be changed on export; leave dtype unset")
    _check_out_dir(src, out, overwrite)

    with CheckpointReader(src) as reader:
        layers = _checked_plan(plan, cfg, fam, reader, fmt).layers
        if fmt != "drop":
            _check_novices(layers, novices, cfg)
        out_dtype = _OUT_DTYPES[dtype] if dtype else None
        model_dtype = _OUT_DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype")))
        tensors, counts = _plan_tensors(reader, fam, layers, novices, fmt, out_dtype, model_dtype)
        config = _out_config(cfg, fam, layers, fmt, dtype, _moe_layers(reader, fam))
        before = sum(int(np.prod(reader.shape(k), dtype=np.int64)) for k in reader.keys())
        bytes_before = sum(
            int(np.prod(reader.shape(k), dtype=np.int64)) * reader.dtype(k).itemsize for k in reader.keys()
        )

        _clean_stale(out)
        tmp = out.parent / f".{out.name}.tmp-{_HOST}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            files = _write_folder(tmp, src, tensors, config, fmt, max_shard_bytes)
            _write_json(tmp / MANIFEST, {"format_version": 1, "format": fmt, "files": files})
            _move_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return {
        "format": fmt,
        "out_dir": str(out),
        "layers": len(layers),
        "params_before": before,
        "params_after": sum(t.numel for t in tensors),
        "bytes_before": bytes_before,
        "bytes_after": sum(t.nbytes for t in tensors),
        **counts,
        "files": len(files) + 1,
    }


def verify_export(out_dir: str | Path) -> list[str]:
    """Problems found in ``out_dir`` against its ``mone_manifest.json`` (empty list = intact)."""
    out = Path(out_dir)
    if not out.is_dir():
        return [f"'{out}' is not a folder"]
    try:
        files = json.loads((out / MANIFEST).read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except FileNotFoundError:
        return [f"{MANIFEST} is missing"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        return [f"{MANIFEST} is malformed ({e})"]
    problems = []
    for name, want in sorted(files.items()):
        path = out / name
        if Path(name).name != name or name in (".", "..", MANIFEST):
            problems.append(f"manifest lists an invalid file name '{name}'")
        elif not path.is_file():
            problems.append(f"missing file '{name}'")
        elif path.stat().st_size != want.get("size"):
            problems.append(f"'{name}' changed: size {path.stat().st_size}, manifest says {want.get('size')}")
        elif _sha256(path) != want.get("sha256"):
            problems.append(f"'{name}' changed: sha256 does not match the manifest")
    problems += [f"unexpected file '{p.name}'" for p in sorted(out.iterdir()) if p.name not in files and p.name != MANIFEST]
    return problems


# ----------------------------------------------------------------------------------------------- checks


def _check_out_dir(src: Path, out: Path, overwrite: bool) -> None:
    s, o = src.resolve(), out.resolve()
    if o == s or o in s.parents:
        raise UserError(f"output folder '{out}' would contain or replace the source '{src}': pick another folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path '{out}' exists and is not a folder: pick another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder '{out}' is not empty: pass overwrite=True (--overwrite) or pick another folder")


def _checked_plan(plan: Plan | dict, cfg: dict, fam: FamilyNames, reader: CheckpointReader, fmt: str) -> Plan:
    """``plan`` validated against the source's config; each planned layer's router has one row per expert."""
    try:
        model_cfg = parse_config(cfg)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"config.json holds an invalid value ({e}): repair it") from None
    plan = Plan.from_dict(plan).validate(model_cfg, "drop" if fmt == "drop" else "substitute")
    for layer in plan.layers:
        router = fam.router_key(layer)
        rows = reader.shape(router)[0] if router in reader else None
        if rows != model_cfg.num_experts:
            raise UserError(f"'{router}' has {rows or 'no'} rows but config.json says {model_cfg.num_experts} "
                            "experts: the checkpoint does not match its config")
    return plan


def _check_novices(layers: dict[int, LayerPlan], novices: dict, cfg: dict) -> None:
    hidden = cfg.get("hidden_size")
    for layer, lp in layers.items():
        for e in lp.novices:
            try:
                v = np.asarray(novices[layer][e])
            except (KeyError, TypeError):
                raise UserError(f"no novice vector for layer {layer} expert {e}: pass the pruned novices") from None
            if v.shape != (hidden,) or not np.all(np.isfinite(v.astype(np.float64))):
                raise UserError(
                    f"novice vector of layer {layer} expert {e} must be {hidden} finite numbers, got shape {list(v.shape)}"
                )


# ---------------------------------------------------------------------------------------------- tensors


def _plan_tensors(
    reader: CheckpointReader,
    fam: FamilyNames,
    layers: dict[int, LayerPlan],
    novices: dict,
    fmt: str,
    out_dtype: np.dtype | None,
    model_dtype: np.dtype | None,
) -> tuple[list[_Tensor], dict]:
    """Output tensors in natural key order, plus parameter counts removed / added.

    Novices are stored in ``out_dtype``, else the config's model dtype, else the router's dtype."""
    counts = {"expert_params_removed": 0, "router_params_removed": 0, "novice_params_added": 0}
    per_expert = {
        layer: re.compile(rf"{re.escape(fam.moe_prefix(layer))}\.experts\.(\d+)\.(.+)") for layer in layers
    }
    fused = {layer: re.compile(rf"{re.escape(fam.moe_prefix(layer))}\.experts\.([^.]+)") for layer in layers}
    router_rows = {
        fam.router_key(layer, what)
        for layer in layers
        for what in ("weight", "bias" if fam.router_bias else None, fam.score_bias)
        if what
    }
    tensors = []

    def cast(dt: np.dtype) -> np.dtype:
        return out_dtype if out_dtype is not None and dt in _FLOATS else dt

    def add(name: str, shape: tuple[int, ...], dt: np.dtype, load: Callable[[], np.ndarray]) -> None:
        tensors.append(_Tensor(name, tuple(shape), cast(dt), load))

    for key in reader.keys():
        shape, dt = reader.shape(key), reader.dtype(key)
        numel = int(np.prod(shape, dtype=np.int64))
        m = re.match(r"model\.layers\.(\d+)\.", key)
        layer = int(m[1]) if m and int(m[1]) in layers else None
        if layer is None:
            add(key, shape, dt, _reader_get(reader, key))
            continue
        lp = layers[layer]
        if pe := per_expert[layer].fullmatch(key):
            e = int(pe[1])
            if e in lp.novices:
                counts["expert_params_removed"] += numel
            else:
                name = key if fmt == "modepd" else f"{fam.moe_prefix(layer)}.experts.{lp.kept.index(e)}.{pe[2]}"
                add(name, shape, dt, _reader_get(reader, key))
        elif fused[layer].fullmatch(key) or (fmt == "drop" and key in router_rows):
            if not shape or shape[0] != len(lp.kept) + len(lp.novices):
                raise UserError(f"'{key}' has shape {list(shape)}: expected one row per expert")
            kind = "expert_params_removed" if key not in router_rows else "router_params_removed"
            counts[kind] += numel // shape[0] * len(lp.novices)
            if lp.novices:
                add(key, (len(lp.kept), *shape[1:]), dt, _reader_rows(reader, key, lp.kept))
            else:
                add(key, shape, dt, _reader_get(reader, key))
        else:
            add(key, shape, dt, _reader_get(reader, key))

    if fmt != "drop":
        for layer, lp in layers.items():
            vdt = out_dtype or model_dtype or reader.dtype(fam.router_key(layer))
            for e in lp.novices:
                name = (
                    f"{fam.moe_prefix(layer)}.experts.{e}.approx_value"
                    if fmt == "modepd"
                    else f"{fam.moe_prefix(layer)}.expert_replacements.{e}.value"
                )
                vec = np.asarray(novices[layer][e])
                tensors.append(_Tensor(name, vec.shape, vdt, lambda v=vec, d=vdt: v.astype(np.float32).astype(d)))
                counts["novice_params_added"] += vec.size
    tensors.sort(key=lambda t: _natural_key(t.name))
    return tensors, counts


def _reader_get(reader: CheckpointReader, key: str) -> Callable[[], np.ndarray]:
    return lambda: reader.get(key)


def _reader_rows(reader: CheckpointReader, key: str, rows: list[int]) -> Callable[[], np.ndarray]:
    return lambda: reader.get_slice(key, np.asarray(rows))


def _natural_key(name: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


# ----------------------------------------------------------------------------------------------- config


def _moe_layers(reader: CheckpointReader, fam: FamilyNames) -> list[int]:
    """Indices of the source's MoE layers (those with a router)."""
    found = (re.fullmatch(r"model\.layers\.(\d+)\..+", key) for key in reader.keys())
    return sorted(int(m[1]) for m in found if m and m[0] == fam.router_key(int(m[1])))


def _out_config(
    cfg: dict, fam: FamilyNames, layers: dict[int, LayerPlan], fmt: str, dtype: str | None, moe_layers: list[int]
) -> dict:
    """config.json of the export (never carrying the source's auto_map)."""
    out = {k: v for k, v in cfg.items() if k != "auto_map"}
    if dtype:
        out["dtype"] = dtype
        if "torch_dtype" in out:
            out["torch_dtype"] = dtype
    stem = _causal_lm_class(fam.model_type).removesuffix("ForCausalLM")
    n_experts = cfg[_num_experts_key(cfg, fam)]
    if fmt == "drop":
        out[_num_experts_key(cfg, fam)] = len(next(iter(layers.values())).kept)
    elif fmt == "substitution":
        targets = {
            f"{fam.moe_prefix(layer)}.experts": {
                "num_logical_experts": n_experts,
                "weight_layout": "compact_retained_experts",
                "replacements": {
                    str(e): {
                        "format": "constant-v1",
                        "tensors": {"value": f"{fam.moe_prefix(layer)}.expert_replacements.{e}.value"},
                    }
                    for e in lp.novices
                },
            }
            for layer, lp in layers.items()
            if lp.novices
        }
        existing = out.get("compression_config")
        out["compression_config"] = {
            **(existing if isinstance(existing, dict) else {}),
            "transform_config": {
                "expert_substitution": {
                    "version": 1,
                    "router_semantics": {
                        "preserve_logical_expert_ids": True,
                        "preserve_router_weights": True,
                        "renormalize_after_substitution": False,
                    },
                    "targets": targets,
                }
            },
        }
        out["auto_map"] = {"AutoModelForCausalLM": f"modeling_mone.Mone{stem}ForCausalLM"}
    else:
        out["model_type"] = fam.model_type + COMPRESSED_SUFFIX
        approx = {str(lyr): layers[lyr].novices if lyr in layers else [] for lyr in moe_layers}
        out["approximate_experts"] = approx
        out["approximate_expert_init_tokens"] = {lyr: [0] * len(ids) for lyr, ids in approx.items()}
        out["auto_map"] = {
            "AutoConfig": f"modeling_mone.{stem}CompressedConfig",
            "AutoModelForCausalLM": f"modeling_mone.Mone{stem}CompressedForCausalLM",
        }
    return out


def _num_experts_key(cfg: dict, fam: FamilyNames) -> str:
    """The config.json key holding the routed expert count (transformers 5 writes Qwen3-MoE's as
    ``num_local_experts`` where hub checkpoints say ``num_experts``)."""
    for key in (fam.num_experts_key, "num_local_experts", "num_experts", "n_routed_experts"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return key
    raise UserError(f"config.json has no valid '{fam.num_experts_key}': is this a {fam.model_type} MoE model?")


def _causal_lm_class(model_type: str) -> str:
    """Stock transformers causal-LM class name of ``model_type`` (as modeling_mone.py subclasses it)."""
    return {
        "olmoe": "OlmoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
        "mixtral": "MixtralForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
        "deepseek_v3": "DeepseekV3ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM", "gpt_oss": "GptOssForCausalLM",
    }[model_type]


# ---------------------------------------------------------------------------------------------- writing


class _HashingFile:
    """A binary file being written, with its running sha256 and size."""

    def __init__(self, path: Path):
        self._f = open(path, "xb")  # noqa: SIM115 - closed in __exit__
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> None:
        self._f.write(data)
        self.sha.update(data)
        self.size += len(memoryview(data).cast("B"))

    def __enter__(self) -> _HashingFile:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def record(self) -> dict:
        return {"sha256": self.sha.hexdigest(), "size": self.size}


def _write_folder(
    tmp: Path, src: Path, tensors: list[_Tensor], config: dict, fmt: str, max_shard_bytes: int
) -> dict[str, dict]:
    """Write weights, config, copied files and (unless drop) the modeling file; return their manifest entries."""
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    files = {}
    names = [SINGLE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for name, shard in zip(names, shards):
        files[name] = _write_shard(tmp / name, shard)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard},
        }
        files[INDEX] = _write_json(tmp / INDEX, index)
    files["config.json"] = _write_json(tmp / "config.json", config)
    for path in sorted(src.iterdir()):
        if path.is_file() and (path.name in _COPIED or path.suffix in _COPIED_SUFFIXES):
            files[path.name] = _copy_data_file(path, tmp / path.name)
    if fmt != "drop":
        files[MODELING] = _write_bytes(tmp / MODELING, Path(__file__).with_name(MODELING).read_bytes())
    return files


def _write_shard(path: Path, tensors: list[_Tensor]) -> dict:
    """Write one safetensors file, one tensor in memory at a time."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": _ST_NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with _HashingFile(path) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors:
            arr = np.ascontiguousarray(t.load().astype(t.dtype, copy=False))
            if arr.shape != t.shape:
                raise UserError(f"tensor '{t.name}' changed shape while exporting: the source is being modified")
            f.write(arr.reshape(-1).view(np.uint8))
        return f.record()


def _write_json(path: Path, obj: dict) -> dict:
    return _write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _write_bytes(path: Path, data: bytes) -> dict:
    with _HashingFile(path) as f:
        f.write(data)
        return f.record()


def _copy_data_file(src: Path, dst: Path) -> dict:
    """Copy a tokenizer / generation file; tokenizer_config.json loses any auto_map (custom code)."""
    data = src.read_bytes()
    if src.name == "tokenizer_config.json":
        try:
            obj = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{src} is not valid JSON ({e}): repair it or remove it") from None
        if isinstance(obj, dict) and "auto_map" in obj:
            del obj["auto_map"]
            return _write_json(dst, obj)
    return _write_bytes(dst, data)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out``, replacing an existing ``out`` only at the very end."""
    old = out.parent / f".{out.name}.old-{_HOST}-{os.getpid()}"
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _clean_stale(out: Path) -> None:
    """Remove what killed exports to ``out`` from this host left behind: temporary folders of dead
    processes, and the set-aside previous ``out`` (put back when the kill came before the new one
    was moved into place)."""
    for kind in ("tmp", "old"):
        prefix = f".{out.name}.{kind}-{_HOST}-"
        for path in out.parent.glob(glob.escape(prefix) + "*"):
            pid = path.name[len(prefix):]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not out.exists():
                path.rename(out)
            else:
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
