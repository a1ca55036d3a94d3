"""Writing an export folder: safetensors shards (a few tensors in flight: loaded ahead by a helper thread,
hashed by a thread per file), the index, config, copied tokenizer files and the modeling file, then
``mone_manifest.json`` (sha256 and size of every other file) last, all atomically
(:func:`~mone_jax.base.files.atomic_write_folder`); :func:`verify_export` checks a folder against its manifest. What goes in is chosen by :mod:`.export`. :func:`write_export_parts` writes one
folder from several processes, each writing the tensors it holds (the folder on a file system they share).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import queue
import shutil
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from mone_jax.base.errors import UserError
from mone_jax.base.files import atomic_write_folder, part_folder
from mone_jax.convert.formats import MODELING, ExportFormat
from mone_jax.convert.reader import INDEX, SINGLE

MANIFEST = "mone_manifest.json"
_ST_NAME = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
    np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2", np.dtype(ml_dtypes.float8_e8m0fnu): "F8_E8M0", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}
# Plain-data files copied verbatim (tokenizer_config.json is copied without any auto_map).
_COPIED = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "generation_config.json", "chat_template.jinja", "chat_template.json",
)
_COPIED_SUFFIXES = (".model", ".tiktoken")


@dataclass(frozen=True)
class Tensor:
    """One output tensor: its name, shape, dtype and how to produce it."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]
    release: Callable[[int, int], None] | None = None  # (start, stop): those bytes are written and hashed
    prefetch: Callable[[], None] | None = None  # a hint, when it is queued to be loaded: start reading it

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def write_export(out: Path, src: Path, tensors: list[Tensor], config: dict, f: ExportFormat, max_shard_bytes: int,
                 extra_files: dict[str, bytes] | None = None) -> int:
    """Write the folder atomically (:func:`~mone_jax.base.files.atomic_write_folder`), the manifest last; the
    file count."""
    def write(tmp: Path) -> int:
        shards = _write_shards(tmp, tensors, max_shard_bytes)
        files = {name: record for name, (record, _) in shards.items()}
        weight_map = {t: name for name, (_, names) in shards.items() for t in names} if len(shards) > 1 else None
        return _finish(tmp, src, files, weight_map, sum(t.nbytes for t in tensors), config, f, extra_files)

    return atomic_write_folder(out, write)


def write_export_parts(out: Path, src: Path, tensors: list[Tensor], config: dict, f: ExportFormat,
                       max_shard_bytes: int, extra_files: dict[str, bytes] | None, process: int,
                       gather: Callable[[dict], list[dict]]) -> int:
    """:func:`write_export` from several processes: each writes the shards of ``tensors`` (its own) into its
    part folder (a sibling of ``out``, named per process), then process 0 moves every part's shards into its
    temporary folder, writes the index (of all parts), config, copied files and manifest, and moves the folder
    into place. ``gather(obj)`` gives every process's JSON ``obj``, in process order, to every process (it is
    also the barrier: every process returns once the folder is in place, or raises if any process failed)."""
    part = part_folder(out)
    shards = error = None
    try:
        part.mkdir(parents=True)
        shards = _write_shards(part, tensors, max_shard_bytes, f"model-p{process:05d}")
    except (OSError, UserError) as e:
        error = str(e)
    every = gather({"dir": str(part), "shards": shards, "bytes": sum(t.nbytes for t in tensors), "error": error})
    count = 0
    try:  # process 0 moves the other parts' files: each removes its part folder only after the last barrier
        if process == 0 and not any(p["error"] for p in every):
            def write(tmp: Path) -> int:
                files, weight_map = {}, {}
                for i, p in enumerate(every):
                    for name, (record, names) in p["shards"].items():
                        if not (Path(p["dir"]) / name).is_file():
                            raise UserError(f"process 0 does not see process {i}'s shard {p['dir']}/{name}: the "
                                            "output folder must be on a file system every process shares")
                        (Path(p["dir"]) / name).rename(tmp / name)
                        files[name] = record
                        weight_map |= dict.fromkeys(names, name)
                return _finish(tmp, src, files, weight_map, sum(p["bytes"] for p in every), config, f, extra_files)

            count = atomic_write_folder(out, write)
    except (OSError, UserError, ValueError) as e:
        error = str(e)
    done = gather({"error": error})
    shutil.rmtree(part, ignore_errors=True)
    if failed := [f"process {i}: {p['error']}" for i, p in enumerate(every + done) if p["error"]]:
        raise UserError(f"the export to '{out}' failed ({'; '.join(dict.fromkeys(failed))}): nothing was written")
    return count


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


AHEAD = 256 << 20  # bytes of tensors loaded and checked ahead of the writer, by a helper thread
BEHIND = 512 << 20  # bytes written but not yet hashed, before the writer waits for the hashing thread
CHUNK = 64 << 20  # bytes of a tensor written (and then hashed and released) at a time


class _HashingFile:
    """A binary file being written, with its running sha256 and size: the bytes go to the file in the caller's
    thread and to the hash in a thread of the file's own (hashing runs at about the disk's rate, so each takes
    a core), at most ``BEHIND`` bytes behind; :meth:`record` waits for the hash."""

    def __init__(self, path: Path):
        self._f = open(path, "xb")  # noqa: SIM115 - closed in __exit__
        self.sha = hashlib.sha256()
        self.size = 0
        self._queue: queue.Queue = queue.Queue()
        self._behind = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._hash, daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        while (item := self._queue.get()) is not None:
            data, done = item
            self.sha.update(data)
            if done is not None:
                with contextlib.suppress(OSError, ValueError):
                    done()
            with self._cond:
                self._behind -= len(data)
                self._cond.notify()

    def write(self, data, done: Callable[[], None] | None = None) -> None:
        """Write ``data`` (kept unchanged until hashed); ``done()`` runs once it is hashed."""
        data = memoryview(data).cast("B")
        with self._cond:
            self._cond.wait_for(lambda: self._behind <= BEHIND)
            self._behind += len(data)
        self._f.write(data)
        self._queue.put((data, done))
        self.size += len(data)

    def __enter__(self) -> _HashingFile:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()
        self._queue.put(None)
        if exc[0] is not None:
            self._thread.join()

    def record(self) -> dict:
        self._thread.join()
        return {"sha256": self.sha.hexdigest(), "size": self.size}


def _loaded(tensors: list[Tensor]) -> Iterator[tuple[Tensor, np.ndarray]]:
    """(tensor, its bytes as written) in order, loaded (read, checked, cast) by a helper thread up to ``AHEAD``
    bytes before they are asked for: reading the next tensors overlaps writing this one."""
    def load(t: Tensor) -> np.ndarray:
        arr = np.ascontiguousarray(t.load().astype(t.dtype, copy=False))
        if arr.shape != t.shape:
            raise UserError(f"tensor '{t.name}' changed shape while exporting: the source is being modified")
        return arr

    with ThreadPoolExecutor(1, thread_name_prefix="mone-export") as pool:
        ahead: deque[tuple[Tensor, Future]] = deque()
        nbytes, nxt = 0, 0
        try:
            for _ in tensors:
                while nxt < len(tensors) and (not ahead or nbytes + tensors[nxt].nbytes <= AHEAD):
                    if tensors[nxt].prefetch is not None:  # the disk reads every queued tensor at once
                        tensors[nxt].prefetch()
                    ahead.append((tensors[nxt], pool.submit(load, tensors[nxt])))
                    nbytes += tensors[nxt].nbytes
                    nxt += 1
                t, fut = ahead.popleft()
                nbytes -= t.nbytes
                yield t, fut.result()
        finally:
            for _, fut in ahead:
                fut.cancel()


def _write_shards(folder: Path, tensors: list[Tensor], max_shard_bytes: int,
                  prefix: str = "model") -> dict[str, tuple[dict, list[str]]]:
    """Write ``tensors`` into shards of at most ``max_shard_bytes`` (one file named ``SINGLE`` when one shard
    of the default ``prefix`` holds them all); {file: (manifest entry, tensor names)}."""
    shards: list[list[Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    if shards == [[]] and prefix != "model":  # a process that holds nothing writes nothing
        return {}
    names = [SINGLE] if len(shards) == 1 and prefix == "model" else [
        f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    # each file's hash finishes while the next file is written
    hashed = [(name, _write_shard(folder / name, shard), [t.name for t in shard]) for name, shard in zip(names, shards)]
    return {name: (record(), keys) for name, record, keys in hashed}


def _finish(tmp: Path, src: Path, files: dict[str, dict], weight_map: dict[str, str] | None, total: int, config: dict,
            f: ExportFormat, extra_files: dict[str, bytes] | None) -> int:
    """Beside the shards ``files`` (their manifest entries) in ``tmp``: the index (``weight_map``: tensor ->
    file, None for one file), config, copied files, (unless drop) the modeling file, ``extra_files``, then the
    manifest; the file count."""
    files = dict(files)
    if weight_map is not None:
        files[INDEX] = _write_json(tmp / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    files["config.json"] = _write_json(tmp / "config.json", config)
    for path in sorted(src.iterdir()):
        if path.is_file() and (path.name in _COPIED or path.suffix in _COPIED_SUFFIXES):
            files[path.name] = _copy_data_file(path, tmp / path.name)
    if f.ships_modeling:
        files[MODELING] = _write_bytes(tmp / MODELING, Path(__file__).with_name(MODELING).read_bytes())
    for name, data in (extra_files or {}).items():
        if Path(name).name != name or name in files or name == MANIFEST:
            raise ValueError(f"extra file name '{name}' is not a free plain file name")
        files[name] = _write_bytes(tmp / name, data)
    _write_json(tmp / MANIFEST, {"format_version": 1, "format": f.name, "files": files})
    return len(files) + 1


def _write_shard(path: Path, tensors: list[Tensor]) -> Callable[[], dict]:
    """Write one safetensors file, a few tensors in memory at a time (:func:`_loaded`); its manifest entry, once
    hashed, is returned by the function returned."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": _ST_NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with _HashingFile(path) as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t, arr in _loaded(tensors):
            data = arr.reshape(-1).view(np.uint8)
            for a in range(0, data.size, CHUNK):  # a huge tensor (an embedding) is never all in flight at once
                f.write(data[a:a + CHUNK], t.release and functools.partial(t.release, a, a + CHUNK))
    return f.record


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
