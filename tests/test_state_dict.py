"""Names both ways: the Flax model written back under Hugging Face names equals the checkpoint it was read
from, and ``save_hf`` writes the arrays the model holds (not the source's)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PER_FAMILY, assert_close_logits, tiered, torch_logits
from flax import nnx
from safetensors.numpy import load_file

import mone_jax
from mone_jax.base.errors import UserError
from mone_jax.convert.formats import FORMATS, torch_model
from mone_jax.convert.state_dict import hf_state_dict


@pytest.mark.parametrize("family,variant", tiered(PER_FAMILY))
def test_state_dict_equals_the_checkpoint(hf_models, family, variant):
    folder, _ = hf_models(family, variant)
    ours = hf_state_dict(mone_jax.load_hf(folder, progress=False))
    disk = load_file(str(folder / "model.safetensors"))
    assert sorted(ours) == sorted(disk)
    for k, v in disk.items():
        np.testing.assert_array_equal(ours[k], v, err_msg=k)


def _edited_pruned(hf_models, mode: str):
    """A pruned model whose arrays were changed after pruning: novices, an attention kernel, a kept expert."""
    folder, hf = hf_models("olmoe", "a")
    model = mone_jax.load_hf(folder, progress=False)
    ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, (4, 16)).astype(np.int32)
    stats = mone_jax.calibrate(model, [ids], progress=False)
    pruned = mone_jax.prune(model, stats, mone_jax.plan(stats, keep=4), mode=mode)
    blk = pruned.moe_blocks()[1]
    blk.novice_values.set_value(blk.novice_values[...] * 3.0 + 0.5)
    blk.gate_up.set_value(blk.gate_up[...].at[0].multiply(1.5))
    attn = pruned.layers[0].self_attn.q_proj.kernel
    attn.set_value(attn[...] + 0.01)
    return folder, pruned


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_save_hf_writes_the_models_own_arrays(hf_models, tmp_path, fmt):
    drop = FORMATS[fmt].mode == "drop"
    folder, pruned = _edited_pruned(hf_models, FORMATS[fmt].mode)
    out = tmp_path / f"edited_{fmt}"
    mone_jax.save_hf(pruned, out, format=fmt, source=folder)
    back = mone_jax.load_hf(out, progress=False)
    want, got = nnx.to_flat_state(nnx.state(pruned)), dict(nnx.to_flat_state(nnx.state(back)))
    for path, var in want:
        if drop and path[-1] == "kept_ids":  # a drop export is a stock model: experts renumbered 0..K-1
            continue
        np.testing.assert_array_equal(np.asarray(got[path].get_value()), np.asarray(var.get_value()), err_msg=str(path))
    ids = np.random.default_rng(5).integers(0, 96, (2, 12)).astype(np.int32)
    hf = torch_model(out).eval()
    assert_close_logits(np.asarray(pruned(ids)), torch_logits(hf, ids))


def test_save_hf_refuses_to_turn_novices_into_drops(hf_models, tmp_path):
    folder, pruned = _edited_pruned(hf_models, "substitute")
    with pytest.raises(UserError, match="has novices"):
        mone_jax.save_hf(pruned, tmp_path / "x", format="drop", source=folder)
    assert not (tmp_path / "x").exists()


def test_save_hf_refuses_a_foreign_source(hf_models, tmp_path):
    folder, pruned = _edited_pruned(hf_models, "substitute")
    with pytest.raises(UserError, match="is not a model of"):
        mone_jax.save_hf(pruned, tmp_path / "x", source=hf_models("qwen3_moe", "a")[0])
