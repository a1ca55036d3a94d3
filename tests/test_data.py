"""Tests for mone_jax.app.data: every source, window semantics, determinism, and every refusal."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mone_jax.app import data
from mone_jax.app.data import load_token_blocks
from mone_jax.base.errors import UserError

EOS = "<|endoftext|>"
N, L = 6, 24  # blocks asked for in most tests
WORDS = ("the model routes every token to a few experts while novices replace pruned experts with "
         "their mean output so the router keeps its choices and calibration measures variance").split()


def _documents(count: int, seed: int) -> list[str]:
    """Small English-like documents of varied length, some spanning several lines."""
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        lines = [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))).capitalize() + "."
                 for _ in range(rng.randint(1, 4))]
        docs.append(f"Doc {i}: " + "\n".join(lines))
    return docs


DOCS = _documents(60, 0)


def _train_tokenizer(texts: list[str], vocab: int) -> Tokenizer:
    """A byte-level BPE tokenizer with an EOS special token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def _save_tokenizer(tok: Tokenizer, folder: Path) -> Path:
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return _train_tokenizer(_documents(200, 1), 400)


@pytest.fixture(scope="module")
def tok_dir(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tokenizer(tok, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the Arrow caches of `datasets` out of the user's home."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _ids(tok: Tokenizer, docs: list[str]) -> list[list[int]]:
    """Independent tokenization: the raw `tokenizers` object, no special tokens."""
    return [tok.encode(d.strip(), add_special_tokens=False).ids for d in docs]


def _stream(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """The EOS-joined token stream of ``docs`` in order."""
    eos = tok.token_to_id(EOS)
    out: list[int] = []
    for i, ids in enumerate(_ids(tok, docs)):
        out += ([eos] if i else []) + ids
    return np.array(out)


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def _assert_windows(blocks: np.ndarray, tok: Tokenizer, docs: list[str]) -> None:
    """Each block is a window of some EOS-joined order of ``docs``: pieces between EOS tokens are
    whole documents, the first piece ends a document and the last one starts a document."""
    eos = tok.token_to_id(EOS)
    doc_ids = _ids(tok, docs)
    whole = {tuple(d) for d in doc_ids}
    for block in blocks.tolist():
        cuts = [i for i, t in enumerate(block) if t == eos]
        if not cuts:
            assert any(_contains(d, block) for d in doc_ids)
            continue
        head, tail = block[:cuts[0]], block[cuts[-1] + 1:]
        assert any(d[len(d) - len(head):] == head for d in doc_ids if len(d) >= len(head))
        assert any(d[:len(tail)] == tail for d in doc_ids)
        for a, b in zip(cuts, cuts[1:]):
            assert tuple(block[a + 1:b]) in whole


def _write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n")
    return path


def _write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)))
    return path


def _write_parquet(path: Path, docs: list[str], field: str = "text") -> Path:
    pq.write_table(pa.table({field: docs, "n": list(range(len(docs)))}), path)
    return path


def _check_source(spec: str, tok: Tokenizer, tok_dir: Path, docs: list[str], **kw) -> None:
    """Contiguous blocks are the stream's start; random ones are seeded windows of it."""
    first = load_token_blocks(spec, tokenizer_dir=tok_dir, num_samples=N, seq_len=L, contiguous=True, **kw)
    assert first.dtype == np.int32 and first.shape == (N, L)
    np.testing.assert_array_equal(first, _stream(tok, docs)[:N * L].reshape(N, L))
    a = load_token_blocks(spec, tokenizer_dir=tok_dir, num_samples=N, seq_len=L, seed=1, **kw)
    b = load_token_blocks(spec, tokenizer_dir=tok_dir, num_samples=N, seq_len=L, seed=1, **kw)
    c = load_token_blocks(spec, tokenizer_dir=tok_dir, num_samples=N, seq_len=L, seed=2, **kw)
    assert a.dtype == np.int32 and a.shape == (N, L)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    _assert_windows(a, tok, docs)
    _assert_windows(c, tok, docs)


def test_txt(tmp_path: Path, tok: Tokenizer, tok_dir: Path) -> None:
    _check_source(str(_write_txt(tmp_path / "a.txt", DOCS)), tok, tok_dir, DOCS)


def test_jsonl(tmp_path: Path, tok: Tokenizer, tok_dir: Path) -> None:
    _check_source(str(_write_jsonl(tmp_path / "a.jsonl", DOCS)), tok, tok_dir, DOCS)


def test_parquet_with_text_field(tmp_path: Path, tok: Tokenizer, tok_dir: Path) -> None:
    path = _write_parquet(tmp_path / "a.parquet", DOCS, field="content")
    _check_source(str(path), tok, tok_dir, DOCS, text_field="content")


def test_compressed_json_lines(tmp_path: Path, tok: Tokenizer, tok_dir: Path) -> None:
    path = tmp_path / "c4-like.json.gz"
    path.write_bytes(gzip.compress(_write_jsonl(tmp_path / "plain.jsonl", DOCS).read_bytes()))
    _check_source(str(path), tok, tok_dir, DOCS)


def test_folder_of_mixed_files_in_sorted_order(tmp_path: Path, tok: Tokenizer, tok_dir: Path) -> None:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    _write_jsonl(folder / "01.jsonl", DOCS[15:30])
    _write_txt(folder / "00.txt", DOCS[:15])
    _write_parquet(folder / "02.parquet", DOCS[30:45])
    _write_jsonl(folder / "sub" / "03.jsonl", DOCS[45:])
    (folder / "notes.md").write_text("not data")
    _write_txt(folder / ".hidden.txt", ["never read"])
    _check_source(str(folder), tok, tok_dir, DOCS)


def test_hub_spec_on_a_local_dataset_folder(tmp_path: Path, tok: Tokenizer, tok_dir: Path) -> None:
    folder = tmp_path / "hub"
    folder.mkdir()
    _write_jsonl(folder / "part-0.jsonl", DOCS[:30])
    _write_jsonl(folder / "part-1.jsonl", DOCS[30:])
    _check_source(f"hf:{folder}", tok, tok_dir, DOCS)
    explicit = load_token_blocks(f"hf:{folder}::train", tokenizer_dir=tok_dir, num_samples=N, seq_len=L,
                                 contiguous=True)
    np.testing.assert_array_equal(explicit, _stream(tok, DOCS)[:N * L].reshape(N, L))


def test_npy_2d_blocks_used_as_given(tmp_path: Path) -> None:
    ids = np.random.default_rng(0).integers(0, 100, size=(10, 40), dtype=np.int64)
    np.save(tmp_path / "b.npy", ids)
    blocks = load_token_blocks(str(tmp_path / "b.npy"), num_samples=N, seq_len=L, vocab_size=100)
    assert blocks.dtype == np.int32
    np.testing.assert_array_equal(blocks, ids[:N, :L])


def test_npy_1d_packed_like_text(tmp_path: Path) -> None:
    np.save(tmp_path / "s.npy", np.arange(1000, dtype=np.uint16))
    spec = str(tmp_path / "s.npy")
    first = load_token_blocks(spec, num_samples=N, seq_len=L, contiguous=True)
    np.testing.assert_array_equal(first, np.arange(N * L).reshape(N, L))
    a, b, c = (load_token_blocks(spec, num_samples=N, seq_len=L, seed=s) for s in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for blocks in (a, c):
        starts = blocks[:, 0]
        np.testing.assert_array_equal(blocks, starts[:, None] + np.arange(L))  # windows of the stream
        assert np.all(np.diff(starts) >= L) and starts[-1] + L <= 1000  # non-overlapping, inside


def test_self_sampler() -> None:
    calls = []

    def sampler(num_samples: int, seq_len: int, seed: int) -> np.ndarray:
        calls.append((num_samples, seq_len, seed))
        return np.random.default_rng(seed).integers(0, 50, size=(num_samples, seq_len))

    blocks = load_token_blocks("self", num_samples=N, seq_len=L, seed=7, vocab_size=50, sampler=sampler)
    assert calls == [(N, L, 7)] and blocks.dtype == np.int32 and blocks.shape == (N, L)
    with pytest.raises(UserError, match="self-sampler returned"):
        load_token_blocks("self", num_samples=N, seq_len=L, sampler=lambda n, t, s: np.zeros((n, t - 1), int))


def test_fewer_blocks_than_asked_warns_and_returns_all(tmp_path: Path, tok: Tokenizer, tok_dir: Path) -> None:
    path = _write_txt(tmp_path / "a.txt", DOCS[:5])
    total = len(_stream(tok, DOCS[:5]))
    with pytest.warns(UserWarning, match="fewer than the 1000 asked"):
        blocks = load_token_blocks(str(path), tokenizer_dir=tok_dir, num_samples=1000, seq_len=L)
    assert blocks.shape == (total // L, L)
    np.save(tmp_path / "b.npy", np.zeros((3, L), np.int32))
    with pytest.warns(UserWarning, match="only 3 blocks"):
        assert load_token_blocks(str(tmp_path / "b.npy"), num_samples=N, seq_len=L).shape == (3, L)


def test_real_corpus_tokenizes_only_what_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Path(__file__).resolve().parents[1]
    found = [d / "train.txt" for d in (repo / "shared" / "corpus", repo.parent / "shared" / "corpus")
             if (d / "train.txt").is_file()]
    if not found:
        pytest.skip("shared corpus absent: ../shared/corpus/train.txt exists only in the project workspace")
    corpus = found[0].read_text()
    tok = _train_tokenizer([corpus[:300_000]], 2000)
    tok_dir = _save_tokenizer(tok, tmp_path / "tokenizer")
    encoded: list[int] = []
    real_encode = data._encode

    def counting_encode(tokenizer, texts: list[str]) -> list[list[int]]:
        encoded.append(sum(map(len, texts)))
        return real_encode(tokenizer, texts)

    monkeypatch.setattr(data, "_encode", counting_encode)
    blocks = load_token_blocks(str(found[0]), tokenizer_dir=tok_dir, num_samples=16, seq_len=256, seed=5)
    assert blocks.shape == (16, 256) and blocks.dtype == np.int32
    assert sum(encoded) < len(corpus) // 100  # a small share of the 14 MB was tokenized
    eos = tok.token_to_id(EOS)
    pieces = [piece for block in blocks.tolist()
              for piece in np.split(block, np.flatnonzero(np.array(block) == eos))[1:-1]]
    assert len(pieces) > 10
    for piece in pieces:  # whole paragraphs of the corpus, drawn from all over it
        assert tok.decode(piece[1:].tolist()) in corpus
    positions = [corpus.index(tok.decode(p[1:].tolist())) for p in pieces]
    assert max(positions) - min(positions) > len(corpus) // 2


@pytest.mark.parametrize(("make", "kwargs", "match"), [
    (lambda p: str(p / "missing.txt"), {}, "does not exist"),
    (lambda p: _touch(p / "a.csv", "x,y"), {}, "unknown extension"),
    (lambda p: _touch(p / "empty.txt", ""), {}, "is empty"),
    (lambda p: _touch(p / "blank.txt", "\n\n  \n\n\n"), {}, "holds no text"),
    (lambda p: str(_mkdir(p / "nothing")), {}, "has no .txt"),
    (lambda p: _touch(p / "short.txt", "Hi there."), {}, "fewer than one block"),
    (lambda p: str(_write_txt(p / "a.txt", DOCS)), {"vocab_size": 10}, r"must lie in \[0, 10\)"),
    (lambda p: str(_write_jsonl(p / "a.jsonl", DOCS, field="body")), {}, "no field 'text'"),
    (lambda p: _touch(p / "bad.jsonl", '{"text": "ok"}\nnot json\n'), {}, "cannot read"),
    (lambda p: _touch(p / "ints.jsonl", '{"text": 5}\n'), {}, "int where text was expected"),
    (lambda p: "hf:", {}, "bad hub data"),
    (lambda p: "hf:a:b:c:d", {}, "bad hub data"),
    (lambda p: f"hf:{_hub(p)}::validation", {}, "Bad split"),
    (lambda p: f"hf:{_hub(p)}:nocfg", {}, "cannot load hub dataset"),
    (lambda p: f"hf:{_hub(p)}", {"text_field": "body"}, "no field 'body'"),
    (lambda p: "self", {}, "needs a model to sample from"),
    (lambda p: _npy(p, np.zeros((4, L), np.float32)), {}, "not integer token ids"),
    (lambda p: _npy(p, np.array([[1, 2]], dtype=object)), {}, "cannot read"),
    (lambda p: _npy(p, np.zeros((4, L - 1), np.int32)), {}, "shorter than --seq-len"),
    (lambda p: _npy(p, np.zeros((2, 2, L), np.int32)), {}, "1-D token stream"),
    (lambda p: _npy(p, np.zeros(0, np.int32)), {}, "holds no tokens"),
    (lambda p: _npy(p, np.arange(L - 1)), {}, "fewer than one block"),
    (lambda p: _npy(p, np.full((N, L), 100)), {"vocab_size": 100}, r"must lie in \[0, 100\)"),
    (lambda p: _npy(p, np.full((N, L), -1)), {}, "must lie in"),
    (lambda p: _npy(p, np.full((N, L), 2**40)), {}, "must lie in"),
    (lambda p: _npy(p, np.zeros((N, L), int)), {"num_samples": 0}, "must be positive"),
    (lambda p: _npy(p, np.zeros((N, L), int)), {"vocab_size": 0}, "must be positive"),
])
def test_refusals(tmp_path: Path, tok_dir: Path, make, kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        load_token_blocks(make(tmp_path), **{"tokenizer_dir": tok_dir, "num_samples": N, "seq_len": L, **kwargs})


@pytest.mark.parametrize(("make_dir", "match"), [
    (lambda p: None, "needs the model folder's tokenizer"),
    (lambda p: p / "nowhere", "does not exist"),
    (lambda p: Path(_touch(_mkdir(p / "model") / "config.json", "{}")).parent, "has no tokenizer files"),
    (lambda p: Path(_touch(_mkdir(p / "model") / "tokenizer_config.json", "{}")).parent, "cannot load the tokenizer"),
])
def test_tokenizer_refusals(tmp_path: Path, make_dir, match: str) -> None:
    path = _write_txt(tmp_path / "a.txt", DOCS)
    with pytest.raises(UserError, match=match):
        load_token_blocks(str(path), tokenizer_dir=make_dir(tmp_path), num_samples=N, seq_len=L)


def test_tokenizer_without_eos_is_refused(tmp_path: Path, tok: Tokenizer) -> None:
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(tmp_path / "noeos"))
    with pytest.raises(UserError, match="no EOS token"):
        load_token_blocks(str(_write_txt(tmp_path / "a.txt", DOCS)), tokenizer_dir=tmp_path / "noeos")


def _touch(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _hub(tmp_path: Path) -> Path:
    folder = _mkdir(tmp_path / "hub")
    _write_jsonl(folder / "part.jsonl", DOCS)
    return folder


def _npy(tmp_path: Path, ids: np.ndarray) -> str:
    np.save(tmp_path / "ids.npy", ids, allow_pickle=True)
    return str(tmp_path / "ids.npy")


def test_calibration_samples_text_not_documents(tmp_path: Path, tok: Tokenizer, tok_dir: Path) -> None:
    """One huge document (no blank line in it) beside 1,000 small ones, a seventh of it all read: blocks fall in
    the huge one in proportion to its tokens (reading by document, they fall in it all or never), and the record
    counts the tokens each document gave."""
    rng = random.Random(3)
    huge = "\n".join(" ".join(rng.choices(WORDS, k=10)) for _ in range(600))
    small = [" ".join(rng.choices(WORDS, k=2)) + "." for _ in range(1000)]  # a few tokens each
    docs = small[:500] + [huge] + small[500:]
    path = _write_txt(tmp_path / "lopsided.txt", docs)
    sizes = [len(ids) + 1 for ids in _ids(tok, docs)]  # each document with its EOS
    share = sizes[500] / sum(sizes)
    assert 0.35 < share < 0.65 and max(sizes[:500] + sizes[501:]) <= 8
    eos = tok.token_to_id(EOS)
    inside = []
    for seed in range(8):
        blocks, record = data.token_blocks(str(path), tokenizer_dir=tok_dir, num_samples=40, seq_len=32, seed=seed)
        runs = [len(run) for block in blocks.tolist() for run in np.split(block, np.flatnonzero(np.equal(block, eos)))]
        inside.append(sum(n for n in runs if n > 8) / blocks.size)  # small documents give runs of a few tokens
        counts = dict(map(tuple, record["tokens_per_document"]))
        assert record["documents"] == len(counts) and record["largest_document_tokens"] == counts[500]
        assert sum(counts.values()) == blocks.size - int((blocks == eos).sum())  # every token but EOS
        assert abs(counts[500] / blocks.size - inside[-1]) < 0.05
    print(inside, share)
    assert 0.05 < min(inside) and max(inside) < 0.95
    assert abs(np.mean(inside) - share) < 0.12
