"""KV-cache decoding: prefill + one-token steps against the full forward, for every family and a pruned model
per export format; greedy `generate` against transformers' own `generate`; the `generate` command; `generate`
data-parallel on a 2x4 mesh against one device; the position limit."""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PER_FAMILY, tiered, torch, transformers
from flax import nnx

import mone_jax
from mone_jax.app.cli import main
from mone_jax.base.errors import UserError
from mone_jax.convert.formats import FORMATS
from mone_jax.convert.load import load_hf
from mone_jax.demo import demo_model_dir
from mone_jax.model.decoding import _decode, cached_hidden, decode_arguments, init_cache
from mone_jax.model.sharding import make_mesh

DEMO = demo_model_dir()
PROMPTS = ["The for statement in Python", "In the beginning", "Once upon a time there was a little",
           "def main():\n    print("]


@partial(jax.jit, static_argnums=(0, 5))
def _cached_and_forward(graphdef, state, ids, mask, right, prefill: int):
    """Logits [B, T, V] of left-padded ``ids``, ``mask``: the first ``prefill`` tokens at once, then one token
    per step through the cache; and the full forward's logits of the same rows right-padded (``right``),
    the caches."""
    model = nnx.merge(graphdef, state)
    B, T = ids.shape
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    h, cache = cached_hidden(model, ids[:, :prefill], positions[:, :prefill], init_cache(model, B, T), mask, 0, True)

    def step(cache, t):
        tok, pos = (jax.lax.dynamic_slice_in_dim(a, t, 1, axis=1) for a in (ids, positions))
        h, cache = cached_hidden(model, tok, pos, cache, mask, t, False)
        return cache, h[:, 0]

    cache, hs = jax.lax.scan(step, cache, jnp.arange(prefill, T))
    ref, _ = model.hidden_states(right, jnp.flip(mask, axis=1))
    return model.logits(jnp.concatenate([h, hs.transpose(1, 0, 2)], axis=1)), model.logits(ref), cache


def _check_decoding_matches_forward(model, seed: int = 0) -> list:
    """Two rows, the second left-padded by 3: every real position's cached logits equal the full forward's
    on the row without padding before it (1e-5 relative); returns the caches."""
    rng = np.random.default_rng(seed)
    T, pad = 11, 3
    ids = rng.integers(0, model.config.vocab_size, (2, T)).astype(np.int32)
    mask = np.ones((2, T), bool)
    mask[1, :pad] = False
    right = ids.copy()  # padding after the tokens: causal attention never sees it
    right[1] = np.roll(ids[1], -pad)
    graphdef, state = nnx.split(model)
    logits, ref, cache = _cached_and_forward(graphdef, state, jnp.asarray(ids), jnp.asarray(mask),
                                             jnp.asarray(right), 5)
    for row in range(2):
        ours = np.asarray(logits[row][mask[row]], np.float64)
        want = np.asarray(ref[row][mask[row][::-1]], np.float64)
        rel = np.linalg.norm(ours - want) / np.linalg.norm(want)
        assert rel <= 1e-5 and np.abs(ours - want).max() <= 1e-5 * np.abs(want).max(), (row, rel)
    return cache


@pytest.mark.parametrize("family, variant", tiered(PER_FAMILY))
def test_cached_decoding_matches_forward(family, variant, hf_models):
    model = load_hf(hf_models(family, variant)[0], progress=False)
    cache = _check_decoding_matches_forward(model)
    cfg, dn = model.config, model.config.deltanet
    for layer, c in zip(model.layers, cache):
        if layer.linear:  # Gated DeltaNet: a state that does not grow (last conv inputs, recurrent state)
            channels = 2 * dn.key_heads * dn.key_dim + dn.value_heads * dn.value_dim
            assert c[0].shape == (2, dn.conv_kernel - 1, channels)
            assert c[1].shape == (2, dn.value_heads, dn.key_dim, dn.value_dim)
        elif cfg.mla:  # the compressed cache: latent + rotated key, never per-head keys and values
            assert c[0].shape == (2, 11, cfg.kv_lora_rank) and c[1].shape == (2, 11, cfg.qk_rope_head_dim)
        else:
            assert c[0].shape == (2, 11, cfg.num_kv_heads, cfg.head_dim)


@pytest.fixture(scope="module")
def calibrated(hf_models):
    folder = hf_models("qwen3_moe", "a")[0]
    model = load_hf(folder, progress=False)
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (4, 16)).astype(np.int32)
    return folder, model, mone_jax.calibrate(model, [ids], progress=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_cached_decoding_of_pruned_exports(fmt, calibrated, tmp_path):
    folder, model, stats = calibrated
    drop = FORMATS[fmt].mode == "drop"
    plan = mone_jax.plan(stats, keep=4)
    pruned = mone_jax.prune(model, stats, plan, mode=FORMATS[fmt].mode)
    mone_jax.save_hf(pruned, tmp_path / fmt, format=fmt, source=folder)
    loaded = load_hf(tmp_path / fmt, progress=False)
    blocks = loaded.moe_blocks().values()
    assert all(b.num_kept == 4 and (b.novice_values.shape[0] == 0) == drop for b in blocks)
    assert drop or any(np.abs(np.asarray(b.novice_values[...])).max() > 0 for b in blocks)
    _check_decoding_matches_forward(loaded, seed=2)


@pytest.fixture(scope="module")
def demo():
    return load_hf(DEMO, progress=False)


@pytest.mark.slow
def test_greedy_generate_matches_transformers(demo):
    tok = transformers.AutoTokenizer.from_pretrained(DEMO)
    hf = transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 1  # batched with left padding
    ours = mone_jax.generate(demo, prompts, max_new_tokens=24)
    eos = hf.generation_config.eos_token_id
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=eos)
        assert got == ref[0, len(prompt):].tolist()


@pytest.mark.slow
def test_sampled_generate_is_seeded_and_stops_at_eos(demo):
    prompts = [[5, 6, 7], [9]]
    run = partial(mone_jax.generate, demo, prompts, max_new_tokens=16, temperature=1.0)
    a = run(seed=3, eos_token_id=[])
    assert a == run(seed=3, eos_token_id=[]) and a != run(seed=4, eos_token_id=[])
    assert [len(r) for r in a] == [16, 16] and a[0] != a[1]
    first = a[0][0]  # a stop token ends its row and is included
    assert run(seed=3, eos_token_id=first)[0] == [first]


def test_generate_cli(demo, capsys):
    argv = ["generate", str(DEMO), "--max-new-tokens", "24", "--quiet"]
    assert main([*argv, *(a for p in PROMPTS for a in ("--prompt", p))]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(DEMO)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    want = [tok.decode(p + new, skip_special_tokens=True)
            for p, new in zip(prompts, mone_jax.generate(demo, prompts, max_new_tokens=24))]
    assert capsys.readouterr().out == "".join(w + "\n" for w in want)
    assert main([*argv, "--prompt", "x", "--temperature", "-1"]) == 2


@pytest.mark.slow
def test_generate_on_a_2x4_mesh_splits_rows_and_matches_one_device(hf_models):
    """On 8 devices as a 2x4 (data, expert) mesh (6 experts padded to 8): greedy and sampled tokens equal one
    device's for prompts of mixed lengths (5 rows padded to 8), and the compiled program holds one row of
    ids and of every KV cache per device, never the whole batch."""
    folder, _ = hf_models("qwen2_moe", "a")
    mesh = make_mesh((2, 4))
    one, sharded = load_hf(folder, progress=False), load_hf(folder, mesh=mesh, progress=False)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, one.config.vocab_size, n).tolist() for n in (3, 7, 1, 5, 6)]
    for temperature in (0.0, 1.0):
        run = partial(mone_jax.generate, prompts=prompts, max_new_tokens=8, eos_token_id=[], temperature=temperature,
                      seed=1)
        assert run(sharded, mesh=mesh) == run(one)

    ids, mask = np.ones((8, 7), np.int32), np.ones((8, 7), bool)
    args = decode_arguments(sharded, ids, mask, jax.random.key(0), 8, temperature=0.0, top_p=1.0, stop=(), pad=0,
                            mesh=mesh)
    compiled = _decode.lower(*args).compile()
    assert compiled.input_shardings[0][2].shard_shape(args[2].shape) == (1, 8)
    hlo = compiled.as_text()
    kv = sharded.layers[0].mixer.init_cache(8, args[5], sharded.dtype)[0].shape  # [B, slots, KV, D]
    per_device, whole = ("f32[" + ",".join(map(str, (rows, *kv[1:]))) + "]" for rows in (1, 8))
    assert per_device in hlo and whole not in hlo


def test_generate_refuses_more_positions_than_the_model_has(demo, capsys):
    """Prompt + new tokens beyond max_position_embeddings: a one-line error before anything compiles (CLI exit
    2); exactly max_position_embeddings positions are accepted."""
    limit = demo.config.max_position_embeddings
    compiled = _decode._cache_size()
    assert main(["generate", str(DEMO), "--prompt", PROMPTS[0], "--max-new-tokens", str(limit), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"mone-jax: error: prompt 0 \(\d+ tokens\) \+ {limit} new tokens exceeds the model's "
                        rf"max_position_embeddings {limit}: [^\n]+\n", err), err
    with pytest.raises(UserError, match=rf"prompt 1 \({limit - 4} tokens\) \+ 5 new tokens exceeds"):
        mone_jax.generate(demo, [[1], [1] * (limit - 4)], max_new_tokens=5)
    assert _decode._cache_size() == compiled
    assert mone_jax.generate(demo, [[1] * limit], max_new_tokens=0) == [[]]  # at the limit: nothing to refuse


def test_nucleus_equals_the_sorted_definition():
    """The sort-free top-p nucleus keeps exactly the tokens a float64 sort keeps: most likely first until the
    mass reaches top_p, ties of the last included; logits with ties, -inf, one dominant token, a flat row."""
    from mone_jax.model.decoding import nucleus

    rng = np.random.default_rng(0)
    rows = [rng.normal(size=300) * 3, np.round(rng.normal(size=300), 1), np.zeros(300),
            np.where(rng.random(300) < 0.5, -np.inf, rng.normal(size=300)), np.r_[30.0, rng.normal(size=299)]]
    logits = np.stack(rows).astype(np.float32)
    for top_p in (0.05, 0.5, 0.9, 0.95, 0.999):
        want = []
        for row in logits.astype(np.float64):
            order = np.argsort(-row, kind="stable")
            p = np.exp(row[order] - row[order][0])
            p /= p.sum()
            kept = int(np.sum(np.cumsum(p) - p < top_p))
            want.append(row >= row[order][kept - 1])
        np.testing.assert_array_equal(np.asarray(nucleus(jnp.asarray(logits), top_p)), np.stack(want), err_msg=top_p)
