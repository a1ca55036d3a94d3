"""Write pruned Hugging Face checkpoints in any format of the registry (:mod:`.formats`).

Two sources: :func:`export_pruned` streams a source checkpoint plus a plan and novice vectors (the
pruned model is never assembled: peak memory is one tensor); :func:`export_model` writes the arrays a
Flax model holds (:func:`~mone_jax.convert.state_dict.hf_state_dict`).
Everything lands in a temporary sibling folder that is renamed into place only when complete; the
last file written is ``mone_manifest.json`` (sha256 and size of every other file), which
``verify_export`` checks. A later export to the same folder removes what killed runs left behind.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from mone_jax.base.errors import UserError
from mone_jax.base.files import atomic_write_folder
from mone_jax.convert.families import Family, family, parse_config
from mone_jax.convert.formats import MODELING, ExportFormat, export_format, recognise
from mone_jax.convert.reader import INDEX, SINGLE, CheckpointReader, read_config
from mone_jax.prune.planning import LayerPlan, Plan

MANIFEST = "mone_manifest.json"
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
    extra_files: dict[str, bytes] | None = None,
) -> dict:
    """Write the pruned checkpoint of ``src_dir`` to ``out_dir`` and return a summary dict.

    ``plan`` is a :class:`~mone_jax.prune.planning.Plan` or its JSON dict (docs/formats.md); ``novices[l][e]`` the
    [hidden] novice vector of
    each novice expert (unused for ``fmt="drop"``); ``extra_files`` (name -> bytes: a model card, the plan)
    are written into the folder and its manifest too.
    """
    f = export_format(fmt)
    src, out = Path(src_dir), Path(out_dir)
    cfg, fam = _source_config(src, dtype, max_shard_bytes)
    _check_out_dir(src, out, overwrite)
    with CheckpointReader(src) as reader:
        layers = _checked_plan(plan, cfg, fam, reader, f).layers
        if f.mode != "drop":
            _check_novices(layers, novices, cfg)
        out_dtype = _OUT_DTYPES[dtype] if dtype else None
        model_dtype = _OUT_DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype")))
        tensors, counts = _plan_tensors(reader, fam, layers, novices, f, out_dtype, model_dtype)
        kept = len(next(iter(layers.values())).kept)
        config = _out_config(cfg, fam, {i: lp.novices for i, lp in layers.items()}, f, dtype,
                             _moe_layers(reader, fam), kept)
        before = sum(int(np.prod(reader.shape(k), dtype=np.int64)) for k in reader.keys())
        bytes_before = sum(
            int(np.prod(reader.shape(k), dtype=np.int64)) * reader.dtype(k).itemsize for k in reader.keys()
        )
        files = _write(out, src, tensors, config, f, max_shard_bytes, extra_files)
    return {"format": fmt, "out_dir": str(out), "layers": len(layers), "params_before": before,
            "params_after": sum(t.numel for t in tensors), "bytes_before": bytes_before,
            "bytes_after": sum(t.nbytes for t in tensors), **counts, "files": files}


def export_model(model, source_dir: str | Path, out_dir: str | Path, *, fmt: str = "substitution",
                 dtype: str | None = None, max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False) -> dict:
    """Write the arrays ``model`` (a :class:`~mone_jax.model.causal_lm.MoEForCausalLM`, pruned or not) holds, in
    format ``fmt``; ``source_dir`` (the original checkpoint) gives config.json and the tokenizer files."""
    from mone_jax.convert.state_dict import hf_state_dict  # imports flax

    f = export_format(fmt)
    src, out = Path(source_dir), Path(out_dir)
    cfg, fam = _source_config(src, dtype, max_shard_bytes)
    mc, sc = model.config, parse_config(cfg)
    if (mc.model_type, mc.hidden_size, mc.num_layers, mc.vocab_size, mc.moe_layers) != \
            (sc.model_type, sc.hidden_size, sc.num_layers, sc.vocab_size, sc.moe_layers):
        raise UserError(f"the model ({mc.model_type}, {mc.num_layers} layers, hidden {mc.hidden_size}) is not a "
                        f"model of '{src}': pass the checkpoint it was loaded from")
    _check_out_dir(src, out, overwrite)
    blocks = model.moe_blocks()
    kept = {i: [int(e) for e in np.asarray(b.kept_ids[...])] for i, b in blocks.items()}
    novices = {i: (np.asarray(b.novice_ids[...]).tolist(), np.asarray(b.novice_values[...], np.float32))
               for i, b in blocks.items()}
    if f.mode == "drop" and any(ids for ids, _ in novices.values()):
        raise UserError(f"the model has novices, which format '{fmt}' cannot hold (it removes experts): "
                        "export it as substitution or modepd, or prune with mode='drop'")
    state = hf_state_dict(model)
    out_dtype = _OUT_DTYPES[dtype] if dtype else None
    names = {k: _renamed(k, fam, kept, f) for k in state}
    tensors = [_Tensor(names[k], a.shape, out_dtype if out_dtype and a.dtype in _FLOATS else a.dtype,
                       lambda a=a: a) for k, a in state.items()]
    for i, (ids, values) in novices.items():
        for e, v in zip(ids, values):
            vdt = out_dtype or np.dtype(blocks[i].novice_values.get_value().dtype)
            tensors.append(_Tensor(f.novice_key(fam, i, e), v.shape, vdt, lambda v=v: v))
    tensors.sort(key=lambda t: _natural_key(t.name))
    config = _out_config(cfg, fam, {i: sorted(ids) for i, (ids, _) in novices.items()}, f, dtype,
                         sorted(blocks), mc.num_experts)
    files = _write(out, src, tensors, config, f, max_shard_bytes)
    return {"format": fmt, "out_dir": str(out), "layers": len(blocks),
            "params_after": sum(t.numel for t in tensors), "bytes_after": sum(t.nbytes for t in tensors),
            "files": files}


def _renamed(key: str, fam: Family, kept: dict[int, list[int]], f: ExportFormat) -> str:
    """``key`` of a compact per-expert tensor (index j among the retained experts) renamed for format ``f``."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
    if not m or int(m[1]) not in kept:
        return key
    layer = int(m[1])
    pe = re.fullmatch(rf"{re.escape(fam.moe_prefix(layer))}\.experts\.(\d+)\.(.+)", key)
    if not pe:
        return key
    ids = kept[layer]
    return f"{fam.moe_prefix(layer)}.experts.{f.disk_index(ids, ids[int(pe[1])])}.{pe[2]}"


def _source_config(src: Path, dtype: str | None, max_shard_bytes: int) -> tuple[dict, Family]:
    """The source's config.json and family, refusing pruned sources and impossible options."""
    if dtype is not None and dtype not in _OUT_DTYPES:
        raise UserError(f"unknown dtype '{dtype}': use one of {', '.join(_OUT_DTYPES)}")
    if max_shard_bytes <= 0:
        raise UserError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    cfg = read_config(src)
    model_type = str(cfg.get("model_type", ""))
    if (pruned := recognise(cfg)) is not None:
        raise UserError(f"'{src}' is already a pruned checkpoint ({model_type}, {pruned.name} format): "
                        "export from the original model")
    fam = family(model_type)
    if dtype is not None and cfg.get("quantization_config"):
        raise UserError(f"'{src}' is quantized: its dtype cannot be changed on export; leave dtype unset")
    return cfg, fam


def _write(out: Path, src: Path, tensors: list[_Tensor], config: dict, f: ExportFormat, max_shard_bytes: int,
           extra_files: dict[str, bytes] | None = None) -> int:
    """Write the folder atomically (:func:`~mone_jax.base.files.atomic_write_folder`), the manifest last; the
    file count."""
    def write(tmp: Path) -> int:
        files = _write_folder(tmp, src, tensors, config, f, max_shard_bytes)
        for name, data in (extra_files or {}).items():
            if Path(name).name != name or name in files or name == MANIFEST:
                raise ValueError(f"extra file name '{name}' is not a free plain file name")
            files[name] = _write_bytes(tmp / name, data)
        _write_json(tmp / MANIFEST, {"format_version": 1, "format": f.name, "files": files})
        return len(files) + 1

    return atomic_write_folder(out, write)


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
        raise UserError(f"output folder '{out}' is not empty: allow overwriting it or pick another folder")


def _checked_plan(plan: Plan | dict, cfg: dict, fam: Family, reader: CheckpointReader, f: ExportFormat) -> Plan:
    """``plan`` validated against the source's config; each planned layer's router has one row per expert."""
    model_cfg = parse_config(cfg)
    plan = Plan.from_dict(plan).validate(model_cfg, f.mode)
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
    fam: Family,
    layers: dict[int, LayerPlan],
    novices: dict,
    f: ExportFormat,
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
    router_rows = {key for layer in layers for key in fam.router_rows(layer)}
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
                name = f"{fam.moe_prefix(layer)}.experts.{f.disk_index(lp.kept, e)}.{pe[2]}"
                add(name, shape, dt, _reader_get(reader, key))
        elif fused[layer].fullmatch(key) or (f.mode == "drop" and key in router_rows):
            # the expert axis: first, but last in ERNIE-4.5's [1, E] score-correction bias
            last = fam.score_bias_2d and key == fam.score_bias_key(layer)
            if not shape or shape[-1 if last else 0] != len(lp.kept) + len(lp.novices):
                raise UserError(f"'{key}' has shape {list(shape)}: expected one row per expert")
            kind = "expert_params_removed" if key not in router_rows else "router_params_removed"
            counts[kind] += numel // (len(lp.kept) + len(lp.novices)) * len(lp.novices)
            if lp.novices and last:
                add(key, (*shape[:-1], len(lp.kept)), dt, lambda k=key, kept=list(lp.kept): reader.get(k)[..., kept])
            elif lp.novices:
                add(key, (len(lp.kept), *shape[1:]), dt, _reader_rows(reader, key, lp.kept))
            else:
                add(key, shape, dt, _reader_get(reader, key))
        else:
            add(key, shape, dt, _reader_get(reader, key))

    if f.novice_key is not None:
        for layer, lp in layers.items():
            vdt = out_dtype or model_dtype or reader.dtype(fam.router_key(layer))
            for e in lp.novices:
                name = f.novice_key(fam, layer, e)
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


def _moe_layers(reader: CheckpointReader, fam: Family) -> list[int]:
    """Indices of the source's MoE layers (those with a router)."""
    found = (re.fullmatch(r"model\.layers\.(\d+)\..+", key) for key in reader.keys())
    return sorted(int(m[1]) for m in found if m and m[0] == fam.router_key(int(m[1])))


def _out_config(cfg: dict, fam: Family, novices: dict[int, list[int]], f: ExportFormat, dtype: str | None,
                moe_layers: list[int], kept: int) -> dict:
    """config.json of the export: the source's (never its auto_map), the dtype, the format's own fields."""
    out = {k: v for k, v in cfg.items() if k != "auto_map"}
    if dtype:
        out["dtype"] = dtype
        if "torch_dtype" in out:
            out["torch_dtype"] = dtype
    return f.write_config(out, fam, novices, moe_layers, kept)


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
    tmp: Path, src: Path, tensors: list[_Tensor], config: dict, f: ExportFormat, max_shard_bytes: int
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
    if f.ships_modeling:
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
