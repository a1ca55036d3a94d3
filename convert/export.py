"""Pruned Hugging Face checkpoints in any format of the registry (:mod:`.formats`): which tensors, under which
names, with which config; :mod:`.writer` writes them.

Three sources: :func:`export_pruned` streams a source checkpoint plus a plan and novice vectors (the
pruned model is never assembled: peak memory is one tensor); :func:`export_from_stats` takes the novices
from calibration statistics; :func:`export_model` writes the arrays a Flax model holds
(:func:`~mone_jax.convert.state_dict.hf_state_dict`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from mone_jax.base.errors import UserError
from mone_jax.base.stats import Stats
from mone_jax.convert.families import Family, family, parse_config
from mone_jax.convert.formats import ExportFormat, export_format, recognise
from mone_jax.convert.quant import exclude_key
from mone_jax.convert.reader import CheckpointReader, StoredTensors, read_config
from mone_jax.convert.writer import Tensor, write_export, write_export_parts
from mone_jax.pruning.planning import LayerPlan, Plan

_OUT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
_FLOATS = {np.dtype(t) for t in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16)}


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

    ``plan`` is a :class:`~mone_jax.pruning.planning.Plan` or its JSON dict (docs/formats.md); ``novices[l][e]`` the
    [hidden] novice vector of
    each novice expert (unused for ``fmt="drop"``); ``extra_files`` (name -> bytes: a model card, the plan)
    are written into the folder and its manifest too.
    """
    f = export_format(fmt)
    src, out = Path(src_dir), Path(out_dir)
    cfg, fam = _source_config(src, dtype, max_shard_bytes)
    check_quantized_export(src, fmt, dtype)
    _check_out_dir(src, out, overwrite)
    with CheckpointReader(src) as reader:
        layers = _checked_plan(plan, cfg, fam, reader, f).layers
        if f.mode != "drop":
            _check_novices(layers, novices, cfg)
        out_dtype = _OUT_DTYPES[dtype] if dtype else None
        model_dtype = _OUT_DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype")))
        tensors, counts = _plan_tensors(reader.stored, fam, layers, novices, f, out_dtype, model_dtype)
        kept = len(next(iter(layers.values())).kept)
        config = _out_config(cfg, fam, {i: lp.novices for i, lp in layers.items()}, f, dtype,
                             _moe_layers(reader, fam), kept)
        stored = reader.stored
        before = sum(int(np.prod(stored.shape(k), dtype=np.int64)) for k in stored.keys())
        bytes_before = sum(
            int(np.prod(stored.shape(k), dtype=np.int64)) * stored.dtype(k).itemsize for k in stored.keys()
        )
        files = write_export(out, src, tensors, config, f, max_shard_bytes, extra_files)
    return {"format": fmt, "out_dir": str(out), "layers": len(layers), "params_before": before,
            "params_after": sum(t.numel for t in tensors), "bytes_before": bytes_before,
            "bytes_after": sum(t.nbytes for t in tensors), **counts, "files": files}


def export_from_stats(folder: str | Path, out_dir: str | Path, stats: Stats | None, plan: Plan | dict, *,
                      fmt: str = "substitution", dtype="float32", out_dtype: str | None = None,
                      overwrite: bool = False, extra_files: dict[str, bytes] | None = None) -> dict:
    """Write the pruned checkpoint of ``folder`` without loading the model.

    :func:`export_pruned` streams the source tensor by tensor into shards; the
    novice vectors are the statistics' means rounded through the compute ``dtype``, exactly as
    :func:`~mone_jax.pruning.transform.prune` sets them, so the folder equals the full-model export. A drop export
    writes no novices and needs no ``stats`` (None).
    """
    from mone_jax.convert.load import config_of, resolve_dtype  # imports flax

    cfg = config_of(folder)
    mode = export_format(fmt).mode
    plan = Plan.from_dict(plan).validate(cfg, mode)
    if stats is None:
        if mode != "drop":
            raise UserError(f"--format {fmt} writes novices, which need calibration statistics: calibrate first")
    else:
        stats.check_matches(cfg.model_type, cfg.num_experts, cfg.moe_layer_ids, cfg.hidden_size)
    dt = resolve_dtype(dtype)
    novices = {i: {} if mode == "drop" else
               {e: v.astype(dt).astype(np.float32) for e, v in
                zip(lp.novices, stats.layers[i].novice_means(lp.novices, plan.semantics, plan.fit_method))}
               for i, lp in plan.layers.items()}
    return export_pruned(folder, out_dir, plan, novices, fmt=fmt, dtype=out_dtype, overwrite=overwrite,
                         extra_files=extra_files)


def export_model(model, source_dir: str | Path, out_dir: str | Path, *, fmt: str = "substitution",
                 dtype: str | None = None, max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False,
                 extra_files: dict[str, bytes] | None = None) -> dict:
    """Write the arrays ``model`` (a :class:`~mone_jax.model.causal_lm.MoEForCausalLM`, pruned or not) holds, in
    format ``fmt``; ``source_dir`` (the original checkpoint) gives config.json and the tokenizer files;
    ``extra_files`` as for :func:`export_pruned`.

    A model spread over several processes is written by all of them (each calls this; ``out_dir`` on a file
    system they share): each process writes the expert rows its devices hold, process 0 the rest, the index and
    the config (:func:`~mone_jax.convert.writer.write_export_parts`). Nothing is gathered on one process."""
    from mone_jax.convert.state_dict import hf_state_dict, host  # imports flax

    f = export_format(fmt)
    src, out = Path(source_dir), Path(out_dir)
    cfg, fam = _source_config(src, dtype, max_shard_bytes)
    mc, sc = model.config, parse_config(cfg)
    if (mc.model_type, mc.hidden_size, mc.num_layers, mc.vocab_size, mc.moe_layers) != \
            (sc.model_type, sc.hidden_size, sc.num_layers, sc.vocab_size, sc.moe_layers):
        raise UserError(f"the model ({mc.model_type}, {mc.num_layers} layers, hidden {mc.hidden_size}) is not a "
                        f"model of '{src}': pass the checkpoint it was loaded from")
    if cfg.get("quantization_config"):
        raise UserError(f"'{src}' is quantized and the model holds its weights dequantized: export with "
                        "export_from_stats or `mone-jax prune`, which copy the quantized bytes of the source")
    _check_out_dir(src, out, overwrite)
    import jax
    from flax import nnx

    share = not all(a.is_fully_addressable for a in jax.tree.leaves(nnx.state(model)) if isinstance(a, jax.Array))
    if share and fam.fused_on_disk:
        raise UserError(f"{mc.model_type} stores each layer's experts as one tensor, which one process would have "
                        "to gather: export from the source checkpoint instead (export_from_stats / export_pruned "
                        "stream it file by file, as `mone-jax prune` does)")
    blocks = model.moe_blocks()
    kept = {i: [int(e) for e in _ids(b.kept_ids.get_value())[:b.num_kept]] for i, b in blocks.items()}
    novices = {i: (host(b.novice_ids[...]).tolist(), host(b.novice_values[...]).astype(np.float32))
               for i, b in blocks.items()}
    if f.mode == "drop" and any(ids for ids, _ in novices.values()):
        raise UserError(f"the model has novices, which format '{fmt}' cannot hold (it removes experts): "
                        "export it as substitution or modepd, or prune with mode='drop'")
    state = hf_state_dict(model, share)
    out_dtype = _OUT_DTYPES[dtype] if dtype else None
    names = {k: _renamed(k, fam, kept, f) for k in state}
    tensors = [Tensor(names[k], a.shape, out_dtype if out_dtype and a.dtype in _FLOATS else a.dtype,
                       lambda a=a: a) for k, a in state.items()]
    for i, (ids, values) in novices.items():
        for e, v in zip(ids, values):
            vdt = out_dtype or np.dtype(blocks[i].novice_values.get_value().dtype)
            tensors.append(Tensor(f.novice_key(fam, i, e), v.shape, vdt, lambda v=v: v))
    tensors.sort(key=lambda t: _natural_key(t.name))
    config = _out_config(cfg, fam, {i: sorted(ids) for i, (ids, _) in novices.items()}, f, dtype,
                         sorted(blocks), mc.num_experts)
    if share:
        from mone_jax.model.sharding import gather_json

        tensors = [t for t in tensors if t.name in state or jax.process_index() == 0]  # process 0: the novices too
        files = write_export_parts(out, src, tensors, config, f, max_shard_bytes, extra_files, jax.process_index(),
                                   gather_json)
        params, size = np.sum(gather_json([sum(t.numel for t in tensors), sum(t.nbytes for t in tensors)]), axis=0)
    else:
        files = write_export(out, src, tensors, config, f, max_shard_bytes, extra_files)
        params, size = sum(t.numel for t in tensors), sum(t.nbytes for t in tensors)
    return {"format": fmt, "out_dir": str(out), "layers": len(blocks), "params_after": int(params),
            "bytes_after": int(size), "files": files}


def _ids(a) -> np.ndarray:
    """An expert-split id buffer as one host array (a few integers, gathered from every process if split)."""
    import jax

    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)


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
    return cfg, family(model_type)


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


def check_quantized_export(src_dir: str | Path, fmt: str, dtype: str | None = None) -> None:
    """UserError, before any work, for an export of a quantized checkpoint that could not stay lossless and
    valid: a changed dtype, ``modepd``, ``drop`` with a quantized router."""
    src = Path(src_dir)
    cfg = read_config(src)
    if not cfg.get("quantization_config"):
        return
    if dtype is not None:
        raise UserError(f"'{src}' is quantized: its dtype cannot be changed on export; leave the output dtype unset")
    f, fam = export_format(fmt), family(str(cfg.get("model_type", "")))
    if f.name == "modepd":
        raise UserError(f"'{src}' is quantized: --format modepd is refused, because the reference loads modepd "
                        "folders with its own model classes, not known to read quantized weights; use substitution "
                        "or drop")
    if f.mode == "drop":
        with CheckpointReader(src) as reader:
            if router := next((k for layer in _moe_layers(reader, fam) for k in fam.router_rows(layer)
                               if reader.quantized(k)), None):
                raise UserError(f"'{router}' is quantized: --format drop cannot remove its rows losslessly; "
                                "use substitution")


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
    reader: StoredTensors,
    fam: Family,
    layers: dict[int, LayerPlan],
    novices: dict,
    f: ExportFormat,
    out_dtype: np.dtype | None,
    model_dtype: np.dtype | None,
) -> tuple[list[Tensor], dict]:
    """Output tensors in natural key order, plus parameter counts removed / added.

    Every source tensor is read as stored (a quantized one's parts byte for byte). Novices are stored in
    ``out_dtype``, else the config's model dtype, else the router's dtype."""
    counts = {"expert_params_removed": 0, "router_params_removed": 0, "novice_params_added": 0}
    per_expert = {
        layer: re.compile(rf"{re.escape(fam.moe_prefix(layer))}\.experts\.(\d+)\.(.+)") for layer in layers
    }
    fused = {layer: re.compile(rf"{re.escape(fam.moe_prefix(layer))}\.experts\.([^.]+)") for layer in layers}
    router_rows = {key for layer in layers for key in fam.router_rows(layer)}
    tensors = []

    def cast(dt: np.dtype) -> np.dtype:
        return out_dtype if out_dtype is not None and dt in _FLOATS else dt

    def add(name: str, shape: tuple[int, ...], dt: np.dtype, load: Callable[[], np.ndarray],
            release: Callable[[int, int], None] | None = None, prefetch: Callable[[], None] | None = None) -> None:
        tensors.append(Tensor(name, tuple(shape), cast(dt), load, release, prefetch))

    def copy(name: str, key: str, shape: tuple[int, ...], dt: np.dtype) -> None:
        """Source tensor ``key`` as stored, under ``name``: a checked view of the file's pages, read ahead from
        when it is queued, released once written and hashed."""
        add(name, shape, dt, lambda: reader.view(key), lambda start, stop: reader.release(key, start, stop),
            lambda: reader.prefetch(key))

    for key in reader.keys():
        shape, dt = reader.shape(key), reader.dtype(key)
        numel = int(np.prod(shape, dtype=np.int64))
        m = re.match(r"model\.layers\.(\d+)\.", key)
        layer = int(m[1]) if m and int(m[1]) in layers else None
        if layer is None:
            copy(key, key, shape, dt)
            continue
        lp = layers[layer]
        if pe := per_expert[layer].fullmatch(key):
            e = int(pe[1])
            if e in lp.novices:
                counts["expert_params_removed"] += numel
            else:
                name = f"{fam.moe_prefix(layer)}.experts.{f.disk_index(lp.kept, e)}.{pe[2]}"
                copy(name, key, shape, dt)
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
                copy(key, key, shape, dt)
        else:
            copy(key, key, shape, dt)

    if f.novice_key is not None:
        for layer, lp in layers.items():
            vdt = out_dtype or model_dtype or reader.dtype(fam.router_key(layer))
            for e in lp.novices:
                name = f.novice_key(fam, layer, e)
                vec = np.asarray(novices[layer][e])
                tensors.append(Tensor(name, vec.shape, vdt, lambda v=vec, d=vdt: v.astype(np.float32).astype(d)))
                counts["novice_params_added"] += vec.size
    tensors.sort(key=lambda t: _natural_key(t.name))
    return tensors, counts


def _reader_rows(reader: StoredTensors, key: str, rows: list[int]) -> Callable[[], np.ndarray]:
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
    """config.json of the export: the source's (never its auto_map), the dtype, the format's own fields; a
    quantized source's novice modules listed as unquantized in its ``quantization_config``."""
    out = {k: v for k, v in cfg.items() if k != "auto_map"}
    if dtype:
        out["dtype"] = dtype
        if "torch_dtype" in out:
            out["torch_dtype"] = dtype
    if (key := exclude_key(cfg)) and f.novice_key is not None and any(novices.values()):
        q = out["quantization_config"]
        modules = [f.novice_key(fam, layer, e).rsplit(".", 1)[0] for layer, nov in novices.items() for e in nov]
        out["quantization_config"] = {**q, key: [*(q.get(key) or []), *modules]}
    return f.write_config(out, fam, novices, moe_layers, kept)


