"""``--precision`` / :func:`mone_jax.base.precision.matmul_precision`: every matmul of the calibration step, the
forward and the decoding program is traced at HIGHEST under ``highest`` (lowered only, never run: the check
holds for TPU and GPU programs, whose backend default is a fast pass), programs traced under one precision are
not reused under the other, and the CLI records the precision in the statistics file."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

import mone_jax
from mone_jax.app.cli import main
from mone_jax.base.errors import UserError
from mone_jax.base.precision import current, default_for, matmul_precision
from mone_jax.base.stats import Stats
from mone_jax.calib.calibration import _embed_step, batch_tables, layer_programs, shard_batch, windows
from mone_jax.model.causal_lm import _forward
from mone_jax.model.decoding import _decode, decode_arguments
from mone_jax.model.sharding import single_device_mesh

MODELS = [("olmoe", "a"), ("deepseek_v3", "grouped_yarn")]
_PRECISION = re.compile(r"precision = \[(\w+), (\w+)\]")


def dot_precisions(text: str) -> list[str]:
    """The precision of every dot / dot_general of a lowered program's StableHLO text (one entry per dot,
    'none' where it states none)."""
    out = []
    for line in text.splitlines():
        if re.search(r"stablehlo\.dot(_general)?\b", line):
            m = _PRECISION.search(line)
            out.append("none" if m is None else m.group(1) if m.group(1) == m.group(2) else f"{m.group(1)},{m.group(2)}")
    return out


def lowered(model, name: str) -> dict[str, str]:
    """StableHLO text of the calibration steps (one per decoder layer), the forward and the decoding program,
    traced under precision ``name``."""
    ids = (np.arange(16, dtype=np.int32).reshape(2, 8) * 7) % model.config.vocab_size
    mask = np.ones(ids.shape, bool)
    texts = {}
    with matmul_precision(name):
        mesh = single_device_mesh()
        table, programs = layer_programs(model, mesh)
        sids, smask = shard_batch(ids, mesh), shard_batch(mask, mesh)
        x = _embed_step(mesh)(table, sids)
        tables = batch_tables(mesh, model.config.rope, model.dtype, windows(model.config))(smask)
        for i, step, state in programs:
            texts[f"calibration layer {i}"] = step.lower(state, x, smask, tables).as_text()
        graphdef, state = nnx.split(model)
        texts["forward"] = _forward.lower(graphdef, state, jnp.asarray(ids), jnp.asarray(mask)).as_text()
        args = decode_arguments(model, ids, mask, jax.random.key(0), 4, temperature=0.0, top_p=1.0, stop=(),
                                pad=0, mesh=None)
        texts["decode"] = _decode.lower(*args).as_text()
    return texts


@pytest.mark.parametrize("family,variant", MODELS)
def test_every_matmul_is_traced_at_the_chosen_precision(hf_models, family, variant):
    model = mone_jax.load_hf(hf_models(family, variant)[0], progress=False)
    high, low = lowered(model, "highest"), lowered(model, "default")
    for what, text in high.items():
        found = dot_precisions(text)
        assert found, f"{what}: no dot in the lowered program"
        assert set(found) == {"HIGHEST"}, f"{what} under 'highest': {sorted(set(found))}"
    for what, text in low.items():  # explicit HIGHEST (moment sums) stays; the model's products run at DEFAULT
        assert "DEFAULT" in dot_precisions(text), f"{what} under 'default': {sorted(set(dot_precisions(text)))}"
    assert any(p == "HIGHEST" for t in low.values() for p in dot_precisions(t))  # the moe.py moment sums


def test_programs_traced_under_one_precision_are_not_reused_under_the_other():
    f = jax.jit(lambda a, b: a @ b)
    a = jnp.ones((4, 4), jnp.float32)
    with matmul_precision("highest"):
        f(a, a)
    with matmul_precision("default"):
        f(a, a)
    assert f._cache_size() == 2  # the precision is part of jit's cache key
    with matmul_precision("highest"):
        f(a, a)
        assert dot_precisions(f.lower(a, a).as_text()) == ["HIGHEST"]
    assert f._cache_size() == 2


def test_context_default_and_nesting():
    assert default_for("float32") == default_for(jnp.float32) == "highest"
    assert default_for("bfloat16") == default_for("float16") == default_for(jnp.bfloat16) == "default"
    assert current() == "default"
    with matmul_precision("highest"):
        assert current() == "highest"
        with matmul_precision("default"):  # an inner 'default' is the backend's, not the outer HIGHEST
            assert current() == "default"
        assert current() == "highest"
    assert current() == "default"
    with pytest.raises(UserError, match="unknown precision"), matmul_precision("tf32"):
        pass


@pytest.mark.parametrize("flags,expected", [(["--precision", "highest"], "highest"), ([], "highest"),
                                            (["--precision", "default"], "default")])
def test_calibrate_records_the_precision(hf_models, tmp_path, capsys, flags, expected):
    folder, hf = hf_models("olmoe", "a")
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(3).integers(0, hf.config.vocab_size, (4, 12)).astype(np.int32))
    out = tmp_path / "s.safetensors"
    assert main([str(a) for a in ["calibrate", folder, "--calib", ids, "--stats-out", out, "--quiet", *flags]]) == 0
    with safe_open(str(out), "numpy") as f:
        assert f.metadata()["precision"] == expected
    assert Stats.load(out).meta["precision"] == expected
    assert current() == "default"  # restored after the command


def test_bfloat16_defaults_to_the_backend_precision(hf_models, tmp_path, capsys, monkeypatch):
    import mone_jax.app.cli as cli

    seen = {}

    def spy(args):
        seen["precision"] = current()
        return 0

    folder, _ = hf_models("olmoe", "a")
    for dtype, expected in (("bfloat16", "default"), ("float32", "highest")):
        ns = cli.build_parser().parse_args(["forward", str(folder), "--tokens", "t.npy", "--logits-out", "l.npy",
                                           "--dtype", dtype])
        ns.run, ns.progress = spy, False
        assert cli._run(ns) == 0 and seen["precision"] == expected and ns.precision == expected


def test_plan_and_checkpoint_identity_carry_the_precision(hf_models):
    from mone_jax.calib.calibration import identity
    from mone_jax.convert.load import config_of
    from mone_jax.pruning.planning import LayerPlan, Plan

    plan = Plan("mone", "layer", 1, {0: LayerPlan((0,), (1,), None)}, precision="highest")
    assert plan.to_dict()["precision"] == "highest" and Plan.from_dict(plan.to_dict()) == plan
    assert "precision" not in Plan("mone", "layer", 1, plan.layers).to_dict()  # older layout when unrecorded
    cfg = config_of(hf_models("olmoe", "a")[0])
    assert "precision" not in identity(cfg, "full")  # checkpoints written before the option resume at 'default'
    with matmul_precision("highest"):
        assert identity(cfg, "full")["precision"] == "highest"  # not resumed at another precision
