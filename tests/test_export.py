"""Export of pruned checkpoints (substitution, mode-pd, drop) checked against transformers.

Each family's tiny random model is pruned by a plan; the export is loaded back with transformers
and its logits are compared with an independent PyTorch application of the same plan on the
original model (kept experts as before, novices ``weight * vector``; drop: experts and router
rows removed by hand).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import PER_FAMILY, build_hf, save_hf, tiered, torch, transformers
from safetensors import safe_open
from torch_apply import per_expert

from mone_jax.base.errors import UserError
from mone_jax.convert import writer as writer_mod
from mone_jax.convert.export import export_pruned
from mone_jax.convert.families import family
from mone_jax.convert.formats import FORMATS as REGISTRY
from mone_jax.convert.formats import export_format, torch_model
from mone_jax.convert.writer import verify_export

# Every model comes from conftest's one table of tiny configs (one variant per family: PER_FAMILY); expert
# counts, hidden size, vocabulary and router groups are read from each model's config. That table mixes in
# dense layers (qwen2_moe b: layer 0, so MoE layer ids differ from their MoE position; deepseek / glm4:
# first_k_dense_replace), shared experts, sliding windows shorter than the 12-token input (mixtral b,
# gpt_oss a), router biases (gpt_oss) and e_score_correction_bias (deepseek_v3, glm4_moe), which the
# accounting below depends on. The old local table's special-token ids and larger expert init, N(0, 0.3),
# are not needed: no test uses a tokenizer or masks tokens, every exported tensor is compared exactly with its
# source (_check_weights), and the roundtrip asserts that novices / dropping move the logits by > 1e-3, far
# above the comparison tolerance.
FORMATS = tuple(REGISTRY)  # every registered export format is under these tests
# Drop mode must keep a multiple of n_group experts with enough per group for top-k from topk_group groups:
# deepseek_v2 group_yarn (8 experts, top-3, 4 groups, 2 of them per token) could only "drop" to all 8, so
# its drop export uses top-2 instead (1 expert kept per group, routing still group-limited).
DROP_OVERRIDES = {("deepseek_v2", "group_yarn"): dict(num_experts_per_tok=2)}


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def out(tmp_path) -> Path:
    """Export folder; named after the test so transformers' remote-code cache never shares it between workers."""
    return tmp_path / tmp_path.name


def _n_experts(model) -> int:
    cfg = model.config
    return next(getattr(cfg, a) for a in ("num_experts", "num_local_experts", "n_routed_experts")
                if getattr(cfg, a, None))


def _groups(model) -> int:
    return getattr(model.config, "n_group", None) or 1


def _moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def _plan(model, keep: dict[int, int] | int, seed: int = 1, groups: int = 1) -> tuple[dict, dict]:
    """Random plan (kept subsets differ per layer; with ``groups``, k / groups in each contiguous group of
    ids, as drop mode needs for a group-limited router) and random novice vectors."""
    rng = np.random.default_rng(seed)
    E, hidden = _n_experts(model), model.config.hidden_size
    layers, novices = {}, {}
    for layer in _moe_layers(model):
        k = keep if isinstance(keep, int) else keep[layer]
        size = E // groups
        kept = sorted(g * size + e for g in range(groups) for e in rng.choice(size, k // groups, replace=False).tolist())
        nov = [e for e in range(E) if e not in kept]
        layers[str(layer)] = {"kept": kept, "novices": nov, "scores": rng.random(E).tolist()}
        novices[layer] = {e: rng.normal(0.0, 1.0, hidden).astype(np.float32) for e in nov}
    return {"metric": "mone", "scope": "layer", "keep": keep if isinstance(keep, int) else None,
            "layers": layers}, novices


def _varying_keep(model) -> dict[int, int]:
    return {layer: 3 + i % 3 for i, layer in enumerate(_moe_layers(model))}


def _router_row(model, layer: int, num_experts: int) -> int:
    """Numbers per expert in a layer's router tensors (weight row, bias, score-correction bias), read off the
    torch module rather than a list of families."""
    mlp = model.model.layers[layer].mlp
    router = getattr(mlp, "gate", None) or mlp.router
    tensors = [*router.parameters(), *router.buffers(), *mlp.parameters(recurse=False), *mlp.buffers(recurse=False)]
    return sum(t.numel() for t in tensors if per_expert(t, [0], num_experts) is not None) // num_experts


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.double()


def _ids(model) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))


def _assert_rel(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    err = (ours - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"max|diff| {err:.3g} vs max|ref| {ref.abs().max().item():.3g}"


def _patch_mone(model, plan: dict, novices: dict) -> None:
    """Apply the plan to ``model`` in place, independently of modeling_mone.py: the stock experts
    module computes each kept expert's raw output (weight 1), novices give their vector, and the
    routing weights are applied here without renormalisation."""
    for key, entry in plan["layers"].items():
        experts = model.model.layers[int(key)].mlp.experts
        stock = experts.forward
        kept = set(entry["kept"])
        values = {e: torch.as_tensor(v) for e, v in novices[int(key)].items()}

        def forward(hidden, index, weights, stock=stock, kept=kept, values=values):
            out = torch.zeros_like(hidden)
            for e in index.unique().tolist():
                tok, slot = (index == e).nonzero(as_tuple=True)
                if e in kept:
                    one = torch.ones(len(tok), 1, dtype=weights.dtype)
                    raw = stock(hidden[tok], torch.full((len(tok), 1), e), one)
                else:
                    raw = values[e].to(hidden.dtype).expand(len(tok), -1)
                out.index_add_(0, tok, (weights[tok, slot, None] * raw).to(out.dtype))
            return out

        experts.forward = forward


def _block_own(name: str, prefix: str) -> bool:
    """A tensor of the MoE block itself, not of a submodule (MiniMax-M2's score-correction bias)."""
    return name.startswith(prefix) and "." not in name[len(prefix):]


def _dropped_reference(model, plan: dict):
    """The stock model with the pruned experts and their router rows removed by hand."""
    cfg = model.config.__class__.from_dict(model.config.to_dict())
    k = len(next(iter(plan["layers"].values()))["kept"])
    for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, k)
    state = dict(model.state_dict())
    for key, entry in plan["layers"].items():
        prefix = f"model.layers.{key}.mlp."
        for name in [n for n in state if n.startswith((prefix + "experts.", prefix + "gate.", prefix + "router."))
                     or _block_own(n, prefix)]:
            state[name] = per_expert(state[name], entry["kept"], k + len(entry["novices"]))
    small = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    small.load_state_dict(state, strict=True)
    return small


def _load(out: Path, fmt: str):
    model, info = torch_model(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _data_bytes(folder: Path) -> int:
    """Tensor bytes of a folder's safetensors files (file sizes minus headers)."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            total += f.stat().st_size - 8 - int.from_bytes(fh.read(8), "little")
    return total


def _check_weights(loaded, original, plan: dict, novices: dict, fmt: str) -> None:
    """Every loaded parameter equals its source tensor (nothing left randomly initialised)."""
    f, fam = export_format(fmt), family(original.config.model_type)
    want = dict(original.state_dict())
    for key, entry in plan["layers"].items():
        prefix = f"model.layers.{key}.mlp."
        for name in [n for n in want if n.startswith(prefix + "experts.")]:
            want[name] = want[name][entry["kept"]]
        if f.mode == "drop":
            for name in [n for n in want if n.startswith((prefix + "gate.", prefix + "router.")) or _block_own(n, prefix)]:
                want[name] = per_expert(want[name], entry["kept"], len(entry["kept"]) + len(entry["novices"]))
        for e in entry["novices"] if f.novice_key else []:  # in memory the MoE module is always `mlp`
            where = f.novice_key(fam, int(key), e).removeprefix(fam.moe_prefix(int(key)) + ".")
            want[prefix + where] = torch.as_tensor(novices[int(key)][e])
    got = dict(loaded.state_dict())
    assert sorted(got) == sorted(want)
    for name, tensor in got.items():
        assert torch.equal(tensor, want[name].to(tensor.dtype)), name


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family, variant", tiered(PER_FAMILY))
def test_export_roundtrip(family, variant, fmt, hf_models, tmp_path, out):
    drop = export_format(fmt).mode == "drop"
    if drop and (family, variant) in DROP_OVERRIDES:
        original = build_hf(family, variant, **DROP_OVERRIDES[family, variant])
        src = save_hf(original, tmp_path / "src")
    else:
        src, original = hf_models(family, variant)
    E, hidden = _n_experts(original), original.config.hidden_size
    keep = E // 2 if drop else _varying_keep(original)
    plan, novices = _plan(original, keep, groups=_groups(original) if drop else 1)
    summary = export_pruned(src, out, plan, novices, fmt=fmt)
    assert verify_export(out) == []
    loaded = _load(out, fmt)
    _check_weights(loaded, original, plan, novices, fmt)

    ids = _ids(original)
    if drop:
        assert type(loaded).__module__.startswith("transformers.models.")
        assert "auto_map" not in json.loads((out / "config.json").read_text())
        ref = _logits(_dropped_reference(original, plan), ids)
        assert (ref - _logits(original, ids)).abs().max() > 1e-3  # dropping experts does change the output
    else:
        ref_model = copy.deepcopy(original)  # the session model itself stays untouched
        _patch_mone(ref_model, plan, novices)
        ref = _logits(ref_model, ids)
        assert (ref - _logits(original, ids)).abs().max() > 1e-3  # the novices do change the output
    _assert_rel(_logits(loaded, ids), ref)

    # Sizes drop by exactly what the plan predicts.
    per_expert = {
        layer: sum(p.numel() for p in original.model.layers[layer].mlp.experts.parameters()) // E
        for layer in _moe_layers(original)
    }
    removed = sum(len(v["novices"]) * per_expert[int(k)] for k, v in plan["layers"].items())
    added = 0 if drop else sum(len(v["novices"]) for v in plan["layers"].values()) * hidden
    router = sum(len(v["novices"]) * _router_row(original, int(k), E) for k, v in plan["layers"].items()) \
        if drop else 0
    before = sum(t.numel() for t in original.state_dict().values())
    assert summary["expert_params_removed"] == removed and summary["novice_params_added"] == added
    assert summary["params_before"] == before
    assert summary["params_after"] == before - removed - router + added
    assert sum(t.numel() for t in loaded.state_dict().values()) == summary["params_after"]
    assert _data_bytes(src) - _data_bytes(out) == 4 * (removed + router - added)
    assert summary["bytes_after"] == _data_bytes(out)


@pytest.mark.parametrize("fmt", ["substitution", "modepd"])
def test_keep_all_equals_original(fmt, hf_models, out):
    src, original = hf_models("qwen2_moe", "b")
    plan, novices = _plan(original, _n_experts(original))
    export_pruned(src, out, plan, novices, fmt=fmt)
    ids = _ids(original)
    assert torch.equal(_logits(_load(out, fmt), ids), _logits(original, ids))


def test_substitution_config_block(hf_models, tmp_path):
    src, original = hf_models("mixtral", "b")
    plan, novices = _plan(original, 5)
    export_pruned(src, tmp_path / "out", plan, novices)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    E = _n_experts(original)
    assert cfg["num_local_experts"] == E and cfg["auto_map"] == {
        "AutoModelForCausalLM": "modeling_mone.MoneMixtralForCausalLM"
    }
    sub = cfg["compression_config"]["transform_config"]["expert_substitution"]
    assert sub["router_semantics"] == {"preserve_logical_expert_ids": True, "preserve_router_weights": True,
                                       "renormalize_after_substitution": False}
    target = sub["targets"]["model.layers.1.block_sparse_moe.experts"]
    assert target["num_logical_experts"] == E and target["weight_layout"] == "compact_retained_experts"
    e = plan["layers"]["1"]["novices"][0]
    assert target["replacements"][str(e)] == {
        "format": "constant-v1",
        "tensors": {"value": f"model.layers.1.block_sparse_moe.expert_replacements.{e}.value"},
    }
    with safe_open(tmp_path / "out" / "model.safetensors", "np") as f:
        keys = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.4.w2.weight" in keys
    assert "model.layers.1.block_sparse_moe.experts.5.w2.weight" not in keys
    assert (tmp_path / "out" / "modeling_mone.py").is_file()


def test_modepd_config(hf_models, tmp_path):
    src, original = hf_models("olmoe", "a")
    plan, novices = _plan(original, 5)
    export_pruned(src, tmp_path / "out", plan, novices, fmt="modepd")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "olmoe_compressed"
    assert cfg["approximate_experts"] == {k: v["novices"] for k, v in plan["layers"].items()}
    assert cfg["approximate_expert_init_tokens"] == {k: [0, 0, 0] for k in plan["layers"]}


def test_sharded_bf16_and_copied_files(hf_models, tmp_path, out):
    src, original = hf_models("olmoe", "a")
    work = shutil.copytree(src, tmp_path / "src")  # the session's folder stays untouched
    cfg = json.loads((work / "config.json").read_text())
    (work / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "evil.Model"}}))
    (work / "evil.py").write_text("raise SystemExit('never run')\n")
    (work / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.T", None]},
                                                            "model_max_length": 64}))
    (work / "tokenizer.json").write_text("{}")
    plan, novices = _plan(original, 5)
    summary = export_pruned(work, out, plan, novices, dtype="bfloat16", max_shard_bytes=20_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all(p.stat().st_size < 20_000 + 4096 for p in out.glob("*.safetensors"))
    assert summary["files"] == len(list(out.iterdir()))
    assert not (out / "evil.py").exists() and (out / "tokenizer.json").read_text() == "{}"
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"model_max_length": 64}
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].startswith("modeling_mone.")
    loaded = _load(out, "substitution")
    assert loaded.dtype == torch.bfloat16 and verify_export(out) == []


def test_verify_export_catches_changes(hf_models, tmp_path):
    src, original = hf_models("olmoe", "a")
    plan, novices = _plan(original, 5)
    out = tmp_path / "out"
    export_pruned(src, out, plan, novices)
    assert verify_export(out) == []
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-3] ^= 0x40
    (out / "model.safetensors").write_bytes(bytes(data))
    (out / "generation_config.json").unlink()
    (out / "notes.txt").write_text("x")
    problems = verify_export(out)
    assert len(problems) == 3
    assert any("model.safetensors" in p and "sha256" in p for p in problems)
    assert any("missing" in p and "generation_config.json" in p for p in problems)
    assert any("unexpected" in p and "notes.txt" in p for p in problems)
    (out / "mone_manifest.json").unlink()
    assert verify_export(out) == ["mone_manifest.json is missing"]


def test_existing_output_refused_unless_overwrite(hf_models, tmp_path):
    src, original = hf_models("olmoe", "a")
    plan, novices = _plan(original, 5)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_pruned(src, out, plan, novices)
    assert (out / "keep.txt").read_text() == "mine"
    export_pruned(src, out, plan, novices, overwrite=True)
    assert not (out / "keep.txt").exists() and verify_export(out) == []
    with pytest.raises(UserError, match="source"):
        export_pruned(src, src, plan, novices, overwrite=True)


def test_failure_mid_write_leaves_nothing(hf_models, tmp_path, monkeypatch):
    src, original = hf_models("olmoe", "a")
    plan, novices = _plan(original, 5)
    real = writer_mod._write_shard
    calls = []

    def failing(path, tensors):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"partial")
            raise OSError("disk full")
        return real(path, tensors)

    monkeypatch.setattr(writer_mod, "_write_shard", failing)
    parent = tmp_path / "exports"
    with pytest.raises(OSError, match="disk full"):
        export_pruned(src, parent / "out", plan, novices, max_shard_bytes=20_000)
    assert len(calls) == 2 and list(parent.iterdir()) == []


@pytest.mark.parametrize(
    "family, variant, keep, match",
    [
        ("olmoe", "a", {0: 4, 1: 5}, "same keep count in every layer"),
        ("olmoe", "a", 1, "at least top-k = 2"),
        ("deepseek_v3", "grouped_yarn", 5, "n_group"),  # 16 experts in 4 groups: 5 is no multiple of 4
        ("deepseek_v3", "grouped_yarn", list(range(8)), "same number in every group"),  # [4, 4, 0, 0]
    ],
)
def test_drop_refusals(family, variant, keep, match, hf_models, tmp_path):
    src, original = hf_models(family, variant)
    plan, novices = _plan(original, len(keep) if isinstance(keep, list) else keep)
    if isinstance(keep, list):  # these kept ids in every layer, fresh vectors for the rest
        E, rng = _n_experts(original), np.random.default_rng(2)
        for key, entry in plan["layers"].items():
            entry["kept"], entry["novices"] = keep, [e for e in range(E) if e not in keep]
            novices[int(key)] = {e: rng.normal(0.0, 1.0, original.config.hidden_size).astype(np.float32)
                                 for e in entry["novices"]}
    with pytest.raises(UserError, match=match):
        export_pruned(src, tmp_path / "out", plan, novices, fmt="drop")
    assert not (tmp_path / "out").exists()


def test_bad_plans_refused(hf_models, tmp_path):
    src, original = hf_models("olmoe", "a")
    plan, novices = _plan(original, 5)
    bad = json.loads(json.dumps(plan))
    bad["layers"]["0"]["novices"].pop()
    with pytest.raises(UserError, match="exactly once"):
        export_pruned(src, tmp_path / "a", bad, novices)
    with pytest.raises(UserError, match="no novice vector"):
        export_pruned(src, tmp_path / "b", plan, {0: {}, 1: novices[1]})
    with pytest.raises(UserError, match="unknown export format"):
        export_pruned(src, tmp_path / "c", plan, novices, fmt="gguf")
    bad = json.loads(json.dumps(plan))
    bad["layers"]["7"] = bad["layers"]["0"]
    with pytest.raises(UserError, match="not a MoE layer"):
        export_pruned(src, tmp_path / "d", bad, novices)
