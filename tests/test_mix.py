"""Balanced calibration mixes: the --calib grammar and recipe files, the split of the blocks, and a mix of
the corpus's two sources against calibrating each source's blocks alone and merging."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mone_jax
from mone_jax.app.cli import main
from mone_jax.app.data import token_blocks
from mone_jax.app.mix import META_KEY, MixSource, allocate, parse_mix
from mone_jax.base.errors import UserError
from mone_jax.base.stats import Stats
from mone_jax.demo import demo_model_dir

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "valid.txt"


def test_inline_mix_grammar(tmp_path):
    mix = parse_mix("code.jsonl:0.5,hf:user/set:cfg:validation:0.25,notes.txt:1e-1")
    assert [m.source for m in mix] == ["code.jsonl", "hf:user/set:cfg:validation", "notes.txt"]
    np.testing.assert_allclose([m.share for m in mix], np.array([0.5, 0.25, 0.1]) / 0.85)
    odd = tmp_path / "a,b:0.5"  # an existing path is one source, whatever it holds
    odd.write_text("x")
    assert parse_mix(str(odd)) is None and parse_mix("hf:NAME:CONFIG") is None and parse_mix("self") is None
    with pytest.raises(UserError, match="lacks a share"):
        parse_mix("a.txt:0.5,b.txt")
    with pytest.raises(UserError, match="positive"):
        parse_mix("a.txt:0.5,b.txt:0")
    with pytest.raises(UserError, match="'self'"):
        parse_mix("self:0.5,b.txt:0.5")


@pytest.mark.parametrize("name", ["mix.yaml", "recipe.mix.json"])
def test_recipe_file(tmp_path, name):
    recipe = {"sources": [{"source": "code.jsonl", "share": 3, "text_field": "content"},
                          {"source": "hf:NAME", "share": 1}, {"source": "/abs/notes.txt", "share": 1}]}
    (tmp_path / name).write_text(json.dumps(recipe))  # JSON is YAML too
    assert parse_mix(str(tmp_path / name)) == (MixSource(str(tmp_path / "code.jsonl"), 0.6, "content"),
                                               MixSource("hf:NAME", 0.2), MixSource("/abs/notes.txt", 0.2))
    (tmp_path / name).write_text(json.dumps({"sources": [{"source": "a.txt"}]}))
    with pytest.raises(UserError, match="must hold 'sources'"):
        parse_mix(str(tmp_path / name))


def test_blocks_split_by_largest_remainder():
    def mix(*shares):
        return tuple(MixSource(str(i), s / sum(shares)) for i, s in enumerate(shares))

    assert allocate(mix(0.5, 0.25, 0.25), 8) == [4, 2, 2]
    assert allocate(mix(1, 1, 1), 7) == [3, 2, 2]  # ties to the earlier source
    assert allocate(mix(0.7, 0.2, 0.1), 10) == [7, 2, 1]
    assert allocate(mix(0.65, 0.35), 3) == [2, 1]
    with pytest.raises(UserError, match="leaves no block"):
        allocate(mix(0.95, 0.05), 4)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The corpus's two sources as files: valid.txt starts with the Python documentation and ends with the
    Bible (cut at lines)."""
    if not CORPUS.is_file():
        pytest.skip("shared corpus absent: ../shared/corpus/valid.txt exists only in the project workspace")
    data, folder = CORPUS.read_bytes(), tmp_path_factory.mktemp("sources")
    (folder / "python.txt").write_bytes(data[:100_000].rsplit(b"\n", 1)[0])
    (folder / "bible.txt").write_bytes(data[-100_000:].split(b"\n", 1)[1])
    return folder / "python.txt", folder / "bible.txt"


@pytest.mark.slow
def test_balanced_mix_counts_add_up_to_its_sources(sources, tmp_path):
    python, bible = sources
    demo, seq, n = str(demo_model_dir()), 64, 8
    assert main(["calibrate", demo, "--calib", f"{python}:0.5,{bible}:0.5", "--num-samples", str(n), "--seq-len",
                 str(seq), "--batch-size", "3", "--seed", "7", "--stats-out", str(tmp_path / "mix.safetensors"),
                 "--quiet"]) == 0  # 4 + 4 blocks in batches of 3: the last batch is padded, no block is lost
    mix = Stats.load(tmp_path / "mix.safetensors")
    held = [token_blocks(str(src), tokenizer_dir=demo, num_samples=4, seq_len=seq, seed=7) for src in (python, bible)]
    assert json.loads(mix.meta[META_KEY]) == [
        {"source": str(src), "share": 0.5, "blocks": 4, "tokens": 4 * seq, "documents": h["documents"],
         "largest_document_tokens": h["largest_document_tokens"]} for src, (_, h) in zip((python, bible), held)]
    model = mone_jax.load_hf(demo, progress=False)
    alone = [mone_jax.calibrate(model, _in_threes(ids), progress=False) for ids, _ in held]
    merged = alone[0].merge(alone[1])
    assert mix.tokens == merged.tokens == n * seq
    for i, s in mix.layers.items():
        np.testing.assert_array_equal(s.count, merged.layers[i].count)  # exactly what each source brings
        np.testing.assert_allclose(s.weight_sum, merged.layers[i].weight_sum, rtol=1e-5)
    # the two sources route differently, so the equality above pins down each one's share
    assert any((alone[0].layers[i].count != alone[1].layers[i].count).any() for i in mix.layers)


def _in_threes(ids: np.ndarray) -> list[dict]:
    """Batches of 3 rows (the mix's compiled shape), the last one filled up with masked rows."""
    out = []
    for i in range(0, len(ids), 3):
        part = ids[i:i + 3]
        mask = np.zeros((3, ids.shape[1]), np.int32)
        mask[:len(part)] = 1
        out.append({"input_ids": np.concatenate([part, np.zeros((3 - len(part), ids.shape[1]), ids.dtype)]),
                    "attention_mask": mask})
    return out
