"""Calibration and evaluation data: fixed-size token blocks from text corpora, hub datasets,
token files, or the model's own samples.

Text is tokenized with the model folder's tokenizer (no special tokens per document), documents
are joined with the EOS token, and blocks are windows of that stream. Like the MoNE reference
(zxgx/mode-pd `build_dataset`: stream a corpus, tokenize, concatenate, cut 4096-token blocks),
only as much text is tokenized as the blocks need. For calibration (the default) the text is read
in a seeded random order of pieces, a long document being cut (at line or word breaks) into pieces
of about one block, so that every token has the same chance to be drawn whatever the document sizes
(a file of one huge and many small documents is sampled by text, not by document), and the windows
sit at seeded random non-overlapping offsets; ``contiguous=True`` gives consecutive blocks from the
start of the data in its own order, whole documents, for perplexity. :func:`token_blocks` also says
how many tokens of each document the blocks hold.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from collections.abc import Callable, Iterable, Iterator
from itertools import groupby
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from tqdm.auto import tqdm

from mone_jax.base.errors import UserError
from mone_jax.base.tokens import token_ids

# File suffix -> `datasets` builder. Compressed variants are read by the builders directly.
_BUILDERS = {
    ".txt": "text", ".txt.gz": "text",
    ".jsonl": "json", ".jsonl.gz": "json", ".json": "json", ".json.gz": "json",
    ".parquet": "parquet",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt")
_HUB_SHUFFLE_BUFFER = 10_000  # documents held by the streaming shuffle of a hub dataset
_BATCH_CHARS = 1 << 18  # most characters handed to the tokenizer per call
_CHARS_PER_TOKEN = 8  # generous bound, so a batch rarely holds much more text than the blocks need
_PROGRESS_MIN_TOKENS = 1 << 20  # show a progress bar from this many tokens on
META_KEY = "calibration_data"  # statistics file metadata: token_blocks' record of one text source, as JSON
_PIECE_MIN_TOKENS = 256  # calibration cuts documents into pieces of ~max(seq_len, this) tokens...
_PIECE_CHARS_PER_TOKEN = 4  # ...counted as this many characters each


def load_token_blocks(spec: str, *, tokenizer_dir: str | Path | None = None, num_samples: int = 128,
                      seq_len: int = 2048, seed: int = 0, text_field: str = "text",
                      vocab_size: int | None = None,
                      sampler: Callable[[int, int, int], np.ndarray] | None = None,
                      contiguous: bool = False) -> np.ndarray:
    """Token blocks, int32 [num_samples, seq_len], from ``spec``.

    ``spec`` is ``hf:NAME[:CONFIG][:SPLIT]`` (a hub dataset, streamed; SPLIT defaults to train),
    a .txt file (documents separated by blank lines), a .jsonl/.json/.parquet file (documents in
    ``text_field``), a folder of such files (recursively, in sorted order), a .npy of token ids
    ([N, T] blocks used as given, or 1-D packed like text), or ``self`` (``sampler(num_samples,
    seq_len, seed)`` draws them from the model). The same arguments give the same blocks.
    When the data holds fewer than ``num_samples`` blocks, all it holds are returned with a warning.
    """
    return token_blocks(spec, tokenizer_dir=tokenizer_dir, num_samples=num_samples, seq_len=seq_len, seed=seed,
                        text_field=text_field, vocab_size=vocab_size, sampler=sampler, contiguous=contiguous)[0]


def token_blocks(spec: str, *, tokenizer_dir: str | Path | None = None, num_samples: int = 128,
                 seq_len: int = 2048, seed: int = 0, text_field: str = "text", vocab_size: int | None = None,
                 sampler: Callable[[int, int, int], np.ndarray] | None = None,
                 contiguous: bool = False) -> tuple[np.ndarray, dict]:
    """:func:`load_token_blocks` and the record of what the blocks hold: ``tokens``, and for text
    ``documents`` (how many documents have tokens in the blocks), ``largest_document_tokens`` and
    ``tokens_per_document`` ([[document index in reading order of the data, tokens], ...], the most first)."""
    if num_samples < 1 or seq_len < 1:
        raise UserError(f"--num-samples ({num_samples}) and --seq-len ({seq_len}) must be positive")
    if vocab_size is not None and vocab_size < 1:
        raise UserError(f"vocab_size ({vocab_size}) must be positive")
    rng = None if contiguous else np.random.default_rng(seed)
    record: dict = {}
    if spec == "self":
        blocks = _sampled_blocks(sampler, num_samples, seq_len, seed)
    elif spec.startswith("hf:"):
        docs = _hub_documents(spec, text_field, None if contiguous else seed)
        blocks, record = _text_blocks(docs, spec, tokenizer_dir, num_samples, seq_len, rng)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError(f"data {spec!r} does not exist; give a file, a folder, hf:NAME or self")
        if path.is_file() and path.name.endswith(".npy"):
            blocks = _npy_blocks(path, num_samples, seq_len, rng)
        else:
            piece = None if rng is None else _PIECE_CHARS_PER_TOKEN * max(seq_len, _PIECE_MIN_TOKENS)
            docs = _local_documents(path, text_field, rng, piece)
            blocks, record = _text_blocks(docs, spec, tokenizer_dir, num_samples, seq_len, rng)
    blocks = token_ids(blocks, vocab_size, spec)
    return blocks, {"tokens": int(blocks.size), **record}


def _sampled_blocks(sampler: Callable[[int, int, int], np.ndarray] | None, num_samples: int,
                    seq_len: int, seed: int) -> np.ndarray:
    """Blocks the model samples itself through ``sampler``."""
    if sampler is None:
        raise UserError("data 'self' needs a model to sample from; use it where a model is loaded, or give a corpus")
    blocks = np.asarray(sampler(num_samples, seq_len, seed))
    if blocks.shape != (num_samples, seq_len) or not np.issubdtype(blocks.dtype, np.integer):
        raise UserError(f"the self-sampler returned {blocks.dtype} {list(blocks.shape)}, "
                        f"not integer [{num_samples}, {seq_len}]; fix the sampler")
    return blocks


def _npy_blocks(path: Path, num_samples: int, seq_len: int, rng: np.random.Generator | None) -> np.ndarray:
    """Blocks from a .npy of token ids: rows of a 2-D array, or windows of a 1-D one."""
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {path} as a .npy array ({e}); save token ids with numpy.save") from e
    if not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"{path} holds {ids.dtype}, not integer token ids; save the ids as an integer array")
    if ids.size == 0:
        raise UserError(f"{path} holds no tokens")
    if ids.ndim == 1:
        return _windows(ids, num_samples, seq_len, rng, str(path))
    if ids.ndim != 2:
        raise UserError(f"{path} has shape {list(ids.shape)}; give [N, T] blocks or a 1-D token stream")
    if ids.shape[1] < seq_len:
        raise UserError(f"{path} has rows of {ids.shape[1]} tokens, shorter than --seq-len {seq_len}; "
                        "lower --seq-len or give longer rows")
    return np.asarray(ids[:_block_count(ids.shape[0], num_samples, str(path)), :seq_len])


def _hub_documents(spec: str, text_field: str, seed: int | None) -> Iterator[tuple[int, object]]:
    """(index, document) of a streamed hub dataset ``hf:NAME[:CONFIG][:SPLIT]``, shuffled (with a streaming
    buffer, by document) when ``seed`` is given."""
    import datasets

    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise UserError(f"bad hub data {spec!r}; write hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT "
                        "(hf:NAME::SPLIT for no config)")
    name, config, split = parts[0], (parts[1:2] or [""])[0] or None, (parts[2:3] or [""])[0] or "train"
    if not Path(name).exists():  # a local dataset folder needs no network
        _check_hub_reachable(spec)
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except (ValueError, OSError, datasets.exceptions.DatasetsError) as e:
        raise UserError(f"cannot load hub dataset {spec!r}: {_first_line(e)}") from e
    if seed is not None:
        ds = ds.shuffle(seed=seed, buffer_size=_HUB_SHUFFLE_BUFFER)
    for i, example in enumerate(ds):
        if text_field not in example:
            raise UserError(f"{spec} has no field {text_field!r} (fields: {', '.join(example)}); "
                            "choose it with text_field (--text-field on the command line)")
        yield i, example[text_field]


def _check_hub_reachable(spec: str) -> None:
    """Refuse at once when the Hub cannot be reached, instead of after a minute of logged retries."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return  # the library's own offline mode decides
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as e:
        raise UserError(f"cannot load hub dataset {spec!r}: the Hub ({constants.ENDPOINT}) cannot be reached "
                        f"({e.strerror or e}); check the network, or download the data and give its files") from None


def _local_documents(path: Path, text_field: str, rng: np.random.Generator | None,
                     piece: int | None = None) -> Iterator[tuple[int, object]]:
    """(index, document) of a local file or folder in file order or, with ``rng``, (index, piece) in a ``rng``
    permutation of the pieces of at most about ``piece`` characters the documents are cut into."""
    import datasets

    if path.is_file():
        if _builder(path) is None:
            raise UserError(f"{path} has an unknown extension; use {', '.join(_BUILDERS)} or .npy")
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and _builder(p)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise UserError(f"folder {path} has no {', '.join(_BUILDERS)} files")
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        raise UserError(f"{path} is empty")
    parts = []
    for builder, group in groupby(files, key=_builder):
        options = {"sample_by": "paragraph"} if builder == "text" else {}
        data_files = [str(f) for f in group]
        quiet = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()  # no "Generating train split" bar for reading a local file
        try:
            part = datasets.load_dataset(builder, data_files=data_files, split="train", **options)
        except (ValueError, OSError, StopIteration, datasets.exceptions.DatasetsError) as e:
            cause = e.__cause__ or e
            raise UserError(f"cannot read {', '.join(data_files)}: {_first_line(cause)}") from e
        finally:
            if not quiet:
                datasets.enable_progress_bars()
        field = "text" if builder == "text" else text_field
        if field not in part.column_names:
            raise UserError(f"{data_files[0]} has no field {field!r} (fields: {', '.join(part.column_names)}); "
                            "choose it with text_field (--text-field on the command line)")
        part = part.select_columns([field])
        parts.append(part if field == "text" else part.rename_column(field, "text"))
    ds = datasets.concatenate_datasets(parts)
    if rng is None or piece is None:
        order = np.arange(len(ds)) if rng is None else rng.permutation(len(ds))
        for start in range(0, len(order), 1024):
            rows = order[start:start + 1024].tolist()
            yield from zip(rows, ds[rows]["text"])
        return
    counts = np.array([-(-len(t) // piece) if isinstance(t, str) else 1 for t in ds["text"]], dtype=np.int64)
    counts = np.maximum(counts, 1)
    ends = np.cumsum(counts)
    for unit in rng.permutation(int(ends[-1])).tolist():
        row = int(np.searchsorted(ends, unit, side="right"))
        text = ds[row]["text"]
        yield row, text if counts[row] == 1 else _piece(text, int(unit - ends[row] + counts[row]), int(counts[row]))


def _piece(text: str, k: int, n: int) -> str:
    """Piece ``k`` of ``n`` of ``text``: equal shares, each cut moved back to the last line break (else space)
    in the half share before it."""
    def cut(j: int) -> int:
        if j in (0, n):
            return 0 if j == 0 else len(text)
        target = j * len(text) // n
        floor = target - len(text) // (2 * n)
        at = text.rfind("\n", floor, target)
        at = text.rfind(" ", floor, target) if at < 0 else at
        return target if at < 0 else at + 1

    return text[cut(k):cut(k + 1)]


def _builder(path: Path) -> str | None:
    """The `datasets` builder that reads ``path``, or None for other files."""
    name = path.name.lower()
    return next((b for suffix, b in _BUILDERS.items() if name.endswith(suffix)), None)


def _text_blocks(docs: Iterable[tuple[int, object]], source: str, tokenizer_dir: str | Path | None,
                 num_samples: int, seq_len: int, rng: np.random.Generator | None) -> tuple[np.ndarray, dict]:
    """Tokenize documents until the blocks (plus a quarter for random offsets) are covered; cut them. Also the
    tokens per document they hold (:func:`token_blocks`)."""
    tokenizer = load_tokenizer(tokenizer_dir, source)
    need = num_samples * seq_len + (0 if rng is None else num_samples * seq_len // 4)
    stream, origin = _token_stream(docs, tokenizer, need, source)
    starts = _window_starts(len(stream), num_samples, seq_len, rng, source)
    used = origin[starts[:, None] + np.arange(seq_len)]
    doc, tokens = np.unique(used[used >= 0], return_counts=True)
    top = np.argsort(-tokens, kind="stable")
    return (np.asarray(stream[starts[:, None] + np.arange(seq_len)]),
            {"documents": int(doc.size), "largest_document_tokens": int(tokens.max(initial=0)),
             "tokens_per_document": [[int(doc[i]), int(tokens[i])] for i in top]})


def load_tokenizer(tokenizer_dir: str | Path | None, source: str = "the text"):
    """The model folder's own tokenizer (local files only, no remote code), with an EOS token; ``source`` names
    the text that needs it in the error without a folder."""
    if tokenizer_dir is None:
        raise UserError(f"text data {source!r} needs the model folder's tokenizer; give the model folder")
    folder = Path(tokenizer_dir)
    if not folder.is_dir():
        raise UserError(f"tokenizer folder {folder} does not exist; give the model folder")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise UserError(f"{folder} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
                        "copy the model's tokenizer into it or give token ids as .npy")
    from transformers import AutoTokenizer, PretrainedConfig  # after the checks: the import takes seconds

    # a tokenizer_config.json that names its class needs no model config, whose model type (a pruned export's
    # `*_compressed`) transformers would otherwise try to resolve, with a warning
    named = _tokenizer_class(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False,
                                                  **({"config": PretrainedConfig()} if named else {}))
    except (ValueError, OSError) as e:
        raise UserError(f"cannot load the tokenizer in {folder}: {_first_line(e)}") from e
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer in {folder} has no EOS token to join documents with; set eos_token "
                        "in its tokenizer_config.json")
    return tokenizer


def _tokenizer_class(folder: Path) -> str | None:
    try:
        cls = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    return cls if isinstance(cls, str) else None


def _token_stream(docs: Iterable[tuple[int, object]], tokenizer, need: int, source: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """EOS-joined token ids of the leading documents, stopping once ``need`` tokens are collected, and the
    index of the document each comes from (-1 for the EOS between documents)."""
    eos = tokenizer.eos_token_id
    texts = _texts(docs, source)
    pieces: list[list[int]] = []
    owners: list[int] = []
    total = 0
    with tqdm(total=need, unit="tok", desc="tokenizing", leave=False,
              disable=need < _PROGRESS_MIN_TOKENS) as bar:
        while total < need:
            batch = _take_chars(texts, min(_BATCH_CHARS, _CHARS_PER_TOKEN * (need - total)))
            if not batch:
                break
            for (owner, _), ids in zip(batch, _encode(tokenizer, [text for _, text in batch])):
                if pieces:
                    pieces.append([eos])
                    owners.append(-1)
                pieces.append(ids)
                owners.append(owner)
                added = len(ids) + (len(pieces) > 1)
                bar.update(min(added, need - total))
                total += added
                if total >= need:
                    break
    if total == 0:
        raise UserError(f"{source} holds no text")
    origin = np.repeat(np.array(owners, dtype=np.int64), [len(p) for p in pieces])[:total]
    return np.fromiter((t for piece in pieces for t in piece), dtype=np.int64, count=total), origin


def _texts(docs: Iterable[tuple[int, object]], source: str) -> Iterator[tuple[int, str]]:
    """The (index, document)s stripped, skipping empty ones; refuse values that are not text."""
    for i, doc in docs:
        if doc is None:
            continue
        if not isinstance(doc, str):
            raise UserError(f"{source} has a {type(doc).__name__} where text was expected; choose the text field")
        if doc := doc.strip():
            yield i, doc


def _take_chars(texts: Iterator[tuple[int, str]], budget: int) -> list[tuple[int, str]]:
    """The next (index, text)s, up to the first that brings their length to ``budget`` characters."""
    batch: list[tuple[int, str]] = []
    size = 0
    for item in texts:
        batch.append(item)
        size += len(item[1])
        if size >= budget:
            break
    return batch


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _windows(stream: np.ndarray, num_samples: int, seq_len: int, rng: np.random.Generator | None,
             source: str) -> np.ndarray:
    """Non-overlapping windows of a 1-D stream (:func:`_window_starts`)."""
    starts = _window_starts(len(stream), num_samples, seq_len, rng, source)
    return np.asarray(stream[starts[:, None] + np.arange(seq_len)])


def _window_starts(length: int, num_samples: int, seq_len: int, rng: np.random.Generator | None,
                   source: str) -> np.ndarray:
    """Starts of non-overlapping windows of a stream of ``length``: consecutive from the start without ``rng``,
    else at uniformly random offsets (sorted points in the slack, spread by one block each)."""
    if length < seq_len:
        raise UserError(f"{source} holds {length} tokens, fewer than one block of {seq_len}; "
                        "give more data or lower --seq-len")
    count = _block_count(length // seq_len, num_samples, source)
    starts = np.arange(count) * seq_len
    if rng is not None:
        starts += np.sort(rng.integers(0, length - count * seq_len + 1, size=count))
    return starts


def _block_count(available: int, num_samples: int, source: str) -> int:
    """How many blocks to return: ``num_samples``, or all there are with a warning."""
    if available < num_samples:
        warnings.warn(f"{source} holds only {available} blocks, fewer than the {num_samples} asked; using them all",
                      stacklevel=2)
    return min(available, num_samples)


def _first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
