"""Quantized checkpoints in (fine-grained FP8, compressed-tensors FP8 and INT4) and lossless out.

Each case quantizes a tiny random model of the shared table with the independent NumPy quantizer of
tests/reference.py (INT4 packed by compressed-tensors' own ``pack_to_int32``) and writes beside it the
dequantized float32 folder (FP8 blocks by the NumPy reference, compressed-tensors by its own decompressors). Checks:
the reader's weights equal the reference's; JAX logits of the quantized folder equal transformers' on the
float32 folder; substitution and drop exports hold every retained stored tensor byte for byte, nothing of a
pruned expert, novices unquantized (and so declared), and load in JAX with the logits of the same export made
from the float32 folder. The FP8 block sizes leave partial last blocks (DeepSeek-V3's 24-row
``kv_a_proj_with_mqa`` in blocks of 16); transformers' own FP8 dequantization, wrong on those, only reads
exports whose blocks divide every dimension.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import assert_close_logits, build_hf, rewrite_config, tiered, torch, torch_logits
from flax import nnx
from reference import blockwise_dequantize, blockwise_quantize
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file

import mone_jax
import mone_jax.convert.load as load
from mone_jax.app.cli import main
from mone_jax.base.errors import UserError
from mone_jax.convert.export import export_pruned
from mone_jax.convert.formats import torch_model
from mone_jax.convert.reader import CheckpointReader
from mone_jax.model.sharding import make_mesh

BLOCK = (16, 12)  # FP8 blocks: partial last blocks on rows of 24 / 12, columns of 32 / 16 / 48 / 80
WHOLE = (4, 4)  # divides every dimension of the tiny models: transformers' dequantization is right
GROUP = 4  # INT4 group size (divides every input dimension: compressed-tensors needs that)
_FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
_CT_WEIGHTS = {
    "ct-int4": ("pack-quantized", {"num_bits": 4, "type": "int", "strategy": "group", "group_size": GROUP}),
    "ct-fp8-channel": ("float-quantized", {"num_bits": 8, "type": "float", "strategy": "channel"}),
    "ct-fp8-tensor": ("float-quantized", {"num_bits": 8, "type": "float", "strategy": "tensor"}),
    "ct-fp8-block": ("float-quantized", {"num_bits": 8, "type": "float", "strategy": "block",
                                         "block_structure": list(BLOCK)}),
}
# every projection of attention, dense MLPs and experts (shared ones too); routers (".gate.") stay float32
_QUANTIZED = re.compile(r"\.(self_attn|mlp|block_sparse_moe)\.(?!gate\.).+\.weight$")
CASES = [("fp8", "deepseek_v3", "grouped_yarn"), ("fp8-pow2", "minimax_m2", "a"), ("fp8", "qwen3_moe", "a"),
         ("ct-int4", "qwen3_moe", "a"), ("ct-fp8-channel", "qwen3_moe", "a"), ("ct-fp8-tensor", "minimax_m2", "a"),
         ("ct-fp8-block", "qwen3_moe", "a")]
FAST = [("deepseek_v3", "substitution")]  # the fast tier: block FP8 in DeepSeek-V3's layout, substitution


# ---------------------------------------------------------------------------------------------- helpers


def _torch(a: np.ndarray):
    """NumPy (ml_dtypes floats too) -> torch, bytes unchanged."""
    for np_t, t_t in ((ml_dtypes.float8_e4m3fn, torch.float8_e4m3fn), (ml_dtypes.float8_e8m0fnu, torch.float8_e8m0fnu)):
        if a.dtype == np_t:
            return torch.from_numpy(np.ascontiguousarray(a).view(np.uint8)).view(t_t)
    return torch.from_numpy(np.ascontiguousarray(a))


def _ct_decompressed(scheme: str, parts: dict[str, np.ndarray]) -> np.ndarray:
    """A compressed-tensors module's float32 weight by compressed-tensors' own decompressor."""
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    fmt, weights = _CT_WEIGHTS[scheme]
    args = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights, symmetric=True))
    compressor = PackedQuantizationCompressor if fmt == "pack-quantized" else FloatQuantizationCompressor
    return compressor.decompress({k: _torch(v) for k, v in parts.items()}, args)["weight"].numpy()


def _quantize(src: Path, scheme: str, qdir: Path, fdir: Path, block=BLOCK) -> dict[str, np.ndarray]:
    """Write ``src`` quantized by ``scheme`` to ``qdir`` and its dequantized float32 twin to ``fdir`` (FP8 blocks
    by the NumPy reference, compressed-tensors by its own decompressors); return the twin's tensors."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    stored, floats = {}, {}
    for k, w in load_file(str(src / "model.safetensors")).items():
        stored[k] = floats[k] = w
        if w.ndim != 2 or not _QUANTIZED.search(k):
            continue
        if scheme.startswith("fp8"):
            q, s = blockwise_quantize(w, block, scheme)
            stored[k], stored[k + "_scale_inv"], floats[k] = q, s, blockwise_dequantize(q, s, block)
        elif scheme == "ct-int4":
            q, s = blockwise_quantize(w, (1, GROUP), "int4")
            parts = {"weight_packed": pack_to_int32(torch.from_numpy(q), 4).numpy(), "weight_scale": s,
                     "weight_shape": np.array(w.shape, np.int64)}
            del stored[k]
            stored.update({k.removesuffix("weight") + n: v for n, v in parts.items()})
            floats[k] = _ct_decompressed(scheme, parts)
        else:
            blk = {"ct-fp8-channel": (1, w.shape[1]), "ct-fp8-tensor": w.shape, "ct-fp8-block": BLOCK}[scheme]
            q, s = blockwise_quantize(w, blk, "fp8")
            s = s.reshape(1) if scheme == "ct-fp8-tensor" else s  # channel scales are [R, 1] already
            stored[k], stored[k + "_scale"] = q, s
            floats[k] = _ct_decompressed(scheme, {"weight": q, "weight_scale": s})
    for folder, tensors in ((qdir, stored), (fdir, floats)):
        folder.mkdir()
        shutil.copy(src / "config.json", folder / "config.json")
        save_file({k: _torch(v) for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if scheme.startswith("fp8"):
        qc = {**_FP8, "weight_block_size": list(block)}
    else:
        fmt, weights = _CT_WEIGHTS[scheme]
        qc = {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
              "config_groups": {"group_0": {"targets": ["Linear"], "format": fmt, "input_activations": None,
                                            "weights": {**weights, "symmetric": True, "dynamic": False}}},
              "ignore": ["lm_head", "re:.*\\.gate$"]}
    rewrite_config(qdir, quantization_config=qc)
    return floats


def _raw(folder: Path) -> dict[str, tuple]:
    """{name: (safetensors dtype, shape, bytes)} of every tensor of a folder, read from the files' own headers."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        for name, e in json.loads(data[8:8 + n]).items():
            if name != "__metadata__":
                a, b = e["data_offsets"]
                out[name] = (e["dtype"], tuple(e["shape"]), data[8 + n + a:8 + n + b])
    return out


def _plan(hf, drop: bool, seed: int = 3) -> tuple[dict, dict]:
    """A random plan keeping half the experts of each MoE layer (per router group in drop mode), novices ~ N(0, 1)."""
    cfg, rng = hf.config, np.random.default_rng(seed)
    E = next(getattr(cfg, a) for a in ("n_routed_experts", "num_local_experts", "num_experts") if getattr(cfg, a, None))
    groups = (getattr(cfg, "n_group", None) or 1) if drop else 1
    layers, novices = {}, {}
    for i, layer in enumerate(hf.model.layers):
        if not hasattr(layer.mlp, "experts"):
            continue
        size = E // groups
        kept = sorted(g * size + int(e) for g in range(groups) for e in rng.choice(size, size // 2, replace=False))
        nov = [e for e in range(E) if e not in kept]
        layers[str(i)] = {"kept": kept, "novices": nov, "scores": rng.random(E).tolist()}
        novices[i] = {e: rng.normal(0.0, 1.0, cfg.hidden_size).astype(np.float32) for e in nov}
    return {"metric": "mone", "scope": "layer", "keep": E // 2, "layers": layers}, novices


def _check_lossless(src: Path, out: Path, plan: dict, novices: dict | None, drop: bool) -> None:
    """``out`` holds exactly: every source tensor not of a pruned expert, bytes unchanged (retained experts
    renumbered 0..K-1, fused [E, ...] stacks cut to the kept rows; in drop mode the routers' rows of the kept
    experts), plus (substitution) one float32 novice per pruned expert, ``novices`` when given; its
    quantization_config lists the novices unquantized."""
    s, o = _raw(src), _raw(out)
    want = {}

    def rows(shape: tuple, data: bytes, kept: list[int]) -> tuple:  # a tensor's rows, cut out of its bytes
        n = len(data) // shape[0]
        return (len(kept), *shape[1:]), b"".join(data[r * n:(r + 1) * n] for r in kept)

    for name, (dt, shape, data) in s.items():
        m = re.fullmatch(r"(model\.layers\.(\d+)\.\w+)\.(experts\.(\d+)|experts|gate|router|"
                         r"e_score_correction_bias)(\..+|_\w+)?", name)
        lp = plan["layers"].get(m[2]) if m else None
        if lp is None:
            want[name] = (dt, shape, data)
        elif m[4] is not None:
            if int(m[4]) in lp["kept"]:
                want[f"{m[1]}.experts.{lp['kept'].index(int(m[4]))}{m[5]}"] = (dt, shape, data)
        elif m[3] == "experts" or (drop and (m[3] == "e_score_correction_bias" or m[5] in (
                ".weight", ".bias", ".e_score_correction_bias"))):
            want[name] = (dt, *rows(shape, data, lp["kept"]))
        else:
            want[name] = (dt, shape, data)
    modules = []
    if not drop:
        for layer, lp in plan["layers"].items():
            prefix = next(k for k in s if k.startswith(f"model.layers.{layer}.") and ".experts." in k).split(".experts.")[0]
            for e in lp["novices"]:
                name = f"{prefix}.expert_replacements.{e}.value"
                value = o[name][2] if novices is None else novices[int(layer)][e].tobytes()
                want[name] = ("F32", o[name][1], value)
                modules.append(f"{prefix}.expert_replacements.{e}")
    assert sorted(o) == sorted(want)
    assert all(o[k] == want[k] for k in want), [k for k in want if o[k] != want[k]]
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    key = "ignore" if qc["quant_method"] == "compressed-tensors" else "modules_to_not_convert"
    assert json.loads((out / "config.json").read_text())["quantization_config"] == (
        {**qc, key: [*(qc.get(key) or []), *modules]} if modules else qc)


def _ids(hf) -> np.ndarray:
    return np.random.default_rng(1).integers(0, hf.config.vocab_size, (2, 12)).astype(np.int32)


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("family,fmts,scheme,variant", tiered(
    [(family, fmts, scheme, variant) for scheme, family, variant in CASES
     for fmts in (("substitution", "drop") if (family, "substitution") in FAST else ("substitution+drop",))], fast=FAST))
def test_quantized_in_and_lossless_out(scheme, family, variant, fmts, hf_models, tmp_path, monkeypatch):
    """One quantized folder, its checks, then the exports of each format of ``fmts`` ('+'-separated; the fast
    tier's case splits its two formats over the two tiers)."""
    src, hf = hf_models(family, variant)
    qdir, fdir = tmp_path / "q", tmp_path / "f"
    floats = _quantize(src, scheme, qdir, fdir)
    with CheckpointReader(qdir) as r:
        for k, w in floats.items():
            np.testing.assert_array_equal(r.get(k), w, err_msg=k)
    ids = _ids(hf)
    model = mone_jax.load_hf(qdir, progress=False)
    assert_close_logits(model(ids), torch_logits(torch_model(fdir), ids), atol=1e-5)
    if "substitution" in fmts and (family == "deepseek_v3" or scheme.startswith("ct-fp8")):
        # float8 dequantized on the device(s), each block shape once, equals the reader's (host) weights bit for bit
        with monkeypatch.context() as m:
            m.setattr(load, "_raw", lambda *a: None)
            host = mone_jax.load_hf(qdir, progress=False)
        split = mone_jax.load_hf(qdir, mesh=make_mesh((1, 3), jax.devices()[:3]), progress=False)  # padded stacks
        for (path, a), (_, b), (_, c) in zip(*(nnx.to_flat_state(nnx.state(x)) for x in (model, host, split))):
            np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
            c = np.asarray(jax.device_get(c.get_value()))
            np.testing.assert_array_equal(c[:len(np.asarray(b.get_value()))] if c.ndim else c, np.asarray(b.get_value()))
    for fmt in fmts.split("+"):
        plan, novices = _plan(hf, drop=fmt == "drop")
        qout, fout = tmp_path / f"q-{fmt}", tmp_path / f"f-{fmt}"
        summary = export_pruned(qdir, qout, plan, novices, fmt=fmt)
        _check_lossless(qdir, qout, plan, novices, drop=fmt == "drop")
        assert summary["bytes_after"] == sum(len(t[2]) for t in _raw(qout).values())
        export_pruned(fdir, fout, plan, novices, fmt=fmt)
        assert_close_logits(mone_jax.load_hf(qout, progress=False)(ids), mone_jax.load_hf(fout, progress=False)(ids),
                            atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("scheme,family,variant", [("fp8", "deepseek_v3", "grouped_yarn"), ("ct-int4", "qwen3_moe", "a")])
def test_exports_load_in_transformers(scheme, family, variant, hf_models, tmp_path):
    """Blocks that divide every dimension: transformers reads the quantized exports (dequantizing on CPU) with the
    logits of the same exports made from the float32 folder."""
    src, hf = hf_models(family, variant)
    _quantize(src, scheme, tmp_path / "q", tmp_path / "f", block=WHOLE)
    ids = _ids(hf)
    for fmt in ("substitution", "drop"):
        plan, novices = _plan(hf, drop=fmt == "drop")
        for name in ("q", "f"):
            export_pruned(tmp_path / name, tmp_path / f"{name}-{fmt}-{tmp_path.name}", plan, novices, fmt=fmt)
        ours, ref = (torch_logits(torch_model(tmp_path / f"{n}-{fmt}-{tmp_path.name}"), ids) for n in ("q", "f"))
        assert_close_logits(ours, ref, atol=1e-5)


def test_quantized_refusals(hf_models, tmp_path, capsys):
    """modepd exports (up front in the CLI), a float8 weight without its scales, a scale grid that does not fit
    the block size, a quantized module the config excludes or no config group targets, asymmetric and unknown
    compressed-tensors strategies are refused in one line."""
    src, hf = hf_models("deepseek_v3", "grouped_yarn")
    qdir = tmp_path / "q"
    _quantize(src, "fp8", qdir, tmp_path / "f")
    plan, novices = _plan(hf, drop=False)
    with pytest.raises(UserError, match="--format modepd is refused"):
        export_pruned(qdir, tmp_path / "o", plan, novices, fmt="modepd")
    np.save(tmp_path / "ids.npy", np.zeros((2, 8), np.int32))
    assert main(["prune", str(qdir), "--calib", str(tmp_path / "ids.npy"), "--ratio", "0.25", "--format", "modepd",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: '" in err and "--format modepd is refused" in err and "calibrate:" not in err  # refused up front
    assert not (tmp_path / "o").exists()
    for qc, match in ((dict(_FP8, weight_block_size=[8, 12]), "needs .* does not match its quantization_config"),
                      (dict(_FP8, weight_block_size=list(BLOCK), modules_to_not_convert=["o_proj"]),
                       "is quantized but quantization_config excludes module 'model.layers.0.self_attn.o_proj'")):
        rewrite_config(qdir, quantization_config=qc)
        with pytest.raises(UserError, match=match):
            CheckpointReader(qdir)
    tensors = load_torch(str(qdir / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"]
    save_file(tensors, str(qdir / "model.safetensors"))
    rewrite_config(qdir, quantization_config=dict(_FP8, weight_block_size=list(BLOCK)))
    with pytest.raises(UserError, match=r"'model.layers.1.mlp.experts.3.up_proj.weight' is stored in float8_e4m3fn "
                                        "without the scales"):
        mone_jax.load_hf(qdir, progress=False)
    ct = tmp_path / "ct"
    _quantize(src, "ct-int4", ct, tmp_path / "ct-f")
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    for change, match in (({"targets": ["re:.*self_attn.*"]}, "no config_groups entry of quantization_config targets "
                                                               "'model.layers.0.mlp.down_proj'"),
                          ({"weights": {**group["weights"], "symmetric": False}}, "asymmetric compressed-tensors"),
                          ({"weights": {**group["weights"], "strategy": "tensor_group"}}, "strategy 'tensor_group'")):
        rewrite_config(ct, quantization_config={**qc, "config_groups": {"group_0": {**group, **change}}})
        with pytest.raises(UserError, match=match):
            CheckpointReader(ct)


@pytest.mark.slow
def test_cli_prunes_a_quantized_checkpoint(hf_models, tmp_path):
    """`mone-jax prune` on a block-FP8 DeepSeek-V3-style folder writes an FP8 export whose retained bytes are
    the source's and whose logits in JAX are those of the same plan applied to the float32 twin; with
    --sequential it writes the same tensors."""
    src, hf = hf_models("deepseek_v3", "grouped_yarn")
    qdir, fdir = tmp_path / "q", tmp_path / "f"
    _quantize(src, "fp8", qdir, fdir)
    np.save(tmp_path / "ids.npy", np.random.default_rng(2).integers(0, hf.config.vocab_size, (4, 16)).astype(np.int32))
    for name, folder, extra in (("q", qdir, []), ("f", fdir, []), ("s", qdir, ["--sequential"])):
        assert main(["prune", str(folder), "--calib", str(tmp_path / "ids.npy"), "--ratio", "0.25", *extra,
                     "--out", str(tmp_path / f"{name}-out"), "--plan-out", str(tmp_path / f"{name}-plan.json"),
                     "--quiet"]) == 0
    plan = json.loads((tmp_path / "q-plan.json").read_text())
    assert plan["layers"] == json.loads((tmp_path / "f-plan.json").read_text())["layers"]
    _check_lossless(qdir, tmp_path / "q-out", plan, None, drop=False)
    assert _raw(tmp_path / "s-out") == _raw(tmp_path / "q-out")  # the layer-at-a-time run reads it alike
    ids = _ids(hf)
    assert_close_logits(mone_jax.load_hf(tmp_path / "q-out", progress=False)(ids),
                        mone_jax.load_hf(tmp_path / "f-out", progress=False)(ids), atol=1e-5)


@pytest.mark.slow
def test_gpt_oss_mxfp4_exports_are_lossless(tmp_path):
    """GPT-OSS MXFP4 expert stacks (blocks and scales cut to the kept rows, bytes unchanged) in substitution and
    drop exports, which load in JAX with the logits of the same exports of the float32 twin (dequantized by
    transformers' own MXFP4 decoder)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf = build_hf("gpt_oss", "a", intermediate_size=32)  # MXFP4 packs 32 input values per block
    hf.save_pretrained(tmp_path / "src")
    stored = load_file(str(tmp_path / "src" / "model.safetensors"))
    floats, rng = dict(stored), np.random.default_rng(0)
    for key in [k for k in stored if re.search(r"experts\.(gate_up|down)_proj$", k)]:
        E, n_in, n_out = stored.pop(key).shape
        blocks = rng.integers(0, 256, (E, n_out, n_in // 32, 16), dtype=np.uint8)
        scales = rng.integers(121, 126, (E, n_out, n_in // 32), dtype=np.uint8)
        stored[f"{key}_blocks"], stored[f"{key}_scales"] = blocks, scales
        floats[key] = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                 dtype=torch.float32).numpy()
    for name, tensors in (("q", stored), ("f", floats)):
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "src" / "config.json", tmp_path / name / "config.json")
        save_file({k: _torch(v) for k, v in tensors.items()}, str(tmp_path / name / "model.safetensors"))
    rewrite_config(tmp_path / "q", quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]})
    ids = _ids(hf)
    for fmt in ("substitution", "drop"):
        plan, novices = _plan(hf, drop=fmt == "drop")
        for name in ("q", "f"):
            export_pruned(tmp_path / name, tmp_path / f"{name}-{fmt}", plan, novices, fmt=fmt)
        _check_lossless(tmp_path / "q", tmp_path / f"q-{fmt}", plan, novices, drop=fmt == "drop")
        assert_close_logits(mone_jax.load_hf(tmp_path / f"q-{fmt}", progress=False)(ids),
                            mone_jax.load_hf(tmp_path / f"f-{fmt}", progress=False)(ids), atol=1e-5)


def test_fused_fp8_stack_rows(tmp_path):
    """A fused [E, R, C] FP8 stack with [E, ceil(R/b0), ceil(C/b1)] scales (transformers' in-memory expert layout)
    reads expert rows (one, or several in any order) as the NumPy reference dequantizes them."""
    rng = np.random.default_rng(0)
    key = "model.layers.0.mlp.experts.down_proj"
    q, s = zip(*(blockwise_quantize(rng.normal(size=(24, 20)).astype(np.float32), BLOCK, "fp8") for _ in range(3)))
    save_file({key: _torch(np.stack(q)), key + "_scale_inv": _torch(np.stack(s))}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": dict(_FP8, weight_block_size=list(BLOCK))}))
    with CheckpointReader(tmp_path) as r:
        ref = [blockwise_dequantize(q[e], s[e], BLOCK) for e in range(3)]
        assert r.shape(key) == (3, 24, 20) and r.dtype(key) == np.float32
        np.testing.assert_array_equal(r.get_slice(key, np.array([2, 0])), np.stack([ref[2], ref[0]]))
        np.testing.assert_array_equal(r.get_slice(key, 1), ref[1])
        np.testing.assert_array_equal(r.get(key), np.stack(ref))


def test_fast_decoders_match_their_references():
    """The table decoding of one-byte floats equals ml_dtypes' cast for every byte (both tables: even and odd
    rows); the INT unpacking equals compressed-tensors' own unpack_from_int32 at widths that divide 32 and
    at widths whose values straddle words."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    from mone_jax.convert.quant import to_float32, unpack_int32

    every = np.arange(256, dtype=np.uint8)
    for dt in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.float8_e8m0fnu):
        for a in (every.reshape(16, 16).view(dt), every[:255].reshape(15, 17).view(dt)):
            np.testing.assert_array_equal(to_float32(a), a.astype(np.float32))
    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 5, 8):
        q = torch.from_numpy(rng.integers(-(1 << bits - 1), 1 << bits - 1, (6, 37)).astype(np.int8))
        ref = unpack_from_int32(pack_to_int32(q, bits), bits, q.shape).numpy()
        np.testing.assert_array_equal(unpack_int32(pack_to_int32(q, bits).numpy(), bits, 37), ref, err_msg=str(bits))


@pytest.mark.slow
def test_nan_code_in_float8_expert_is_refused(hf_models, tmp_path):
    """A NaN code planted in one float8 expert weight: the load (dequantizing on the device) and the export
    (copying the stored bytes) each refuse, naming the tensor; the export leaves nothing in its output."""
    src, hf = hf_models("deepseek_v3", "grouped_yarn")
    _quantize(src, "fp8", tmp_path / "q", tmp_path / "f")
    path, key = tmp_path / "q" / "model.safetensors", "model.layers.1.mlp.experts.3.down_proj.weight"
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    entry = json.loads(data[8:8 + n])[key]
    assert entry["dtype"] == "F8_E4M3"
    data[8 + n + entry["data_offsets"][0] + 37] = 0x7F  # a float8_e4m3fn NaN
    path.write_bytes(data)
    with pytest.raises(UserError, match=rf"tensor '{re.escape(key)}' in .* contains NaN or Inf"):
        mone_jax.load_hf(tmp_path / "q", progress=False)
    plan, novices = _plan(hf, drop=False, seed=5)
    E = len(plan["layers"]["1"]["scores"])  # keep the poisoned expert 3
    plan["layers"]["1"] = {**plan["layers"]["1"], "kept": list(range(E // 2)), "novices": list(range(E // 2, E))}
    novices[1] = {e: np.zeros(hf.config.hidden_size, np.float32) for e in range(E // 2, E)}
    with pytest.raises(UserError, match=rf"tensor '{re.escape(key)}' in .* contains NaN or Inf"):
        export_pruned(tmp_path / "q", tmp_path / "out", plan, novices)
    assert not (tmp_path / "out").exists()
