"""Lazy reading of Hugging Face safetensors checkpoints (single file or sharded with index.json)."""

from __future__ import annotations

import functools
import json
import mmap
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from mone_jax.base.errors import UserError
from mone_jax.convert.multimodal import tensor_names, text_config
from mone_jax.convert.quant import QuantTensor, find_quantized

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
VIEW_CHUNK = 64 << 20  # bytes of a StoredTensors.view checked (and mapped) at a time
_PLAIN = (np.float64, np.float32, np.float16, ml_dtypes.bfloat16)  # read as stored, nothing to decode
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "tf_model.h5", "flax_model.msgpack")


def read_config(folder: str | Path) -> dict:
    """config.json of ``folder`` parsed as plain data (never executed); of a multimodal checkpoint, its text
    model's (:mod:`.multimodal`)."""
    folder = Path(folder)
    cfg = _raw_config(folder)
    ours = _ships_our_modeling(folder, cfg)
    code = (["auto_map in config.json"] if "auto_map" in cfg and not ours else []) + sorted(
        p.name for p in folder.glob("*.py") if not (ours and p.name == _OWN_MODELING))
    if code:
        _warn_custom_code(folder, tuple(code))
    return text_config(cfg, folder)


def _raw_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise UserError(f"model folder '{folder}' does not exist: pass a Hugging Face model folder or a hub id ORG/NAME")
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"'{folder}' has no config.json: pass a Hugging Face model folder")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}): repair or re-download it") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return cfg


_OWN_MODELING = "modeling_mone.py"


def _ships_our_modeling(folder: Path, cfg: dict) -> bool:
    """An export of mone-jax: its modeling file is byte for byte the one this package writes and auto_map points
    only at it (nothing to warn about: the file is never run here either)."""
    mine = folder / _OWN_MODELING
    auto = cfg.get("auto_map")
    return (mine.is_file() and isinstance(auto, dict)
            and all(isinstance(v, str) and v.startswith("modeling_mone.") for v in auto.values())
            and mine.read_bytes() == Path(__file__).with_name(_OWN_MODELING).read_bytes())


@functools.cache
def _warn_custom_code(folder: Path, code: tuple[str, ...]) -> None:
    """Warn once per folder (config.json is read by several steps)."""
    warnings.warn(f"'{folder}' ships custom code ({', '.join(code)}): ignored, mone-jax reads config.json "
                  "as data and never runs code from a model folder", stacklevel=3)


_FOUND: dict[tuple, dict[str, QuantTensor]] = {}  # the last few checkpoints' quantized tensors


class CheckpointReader:
    """Reads tensors on demand from ``model.safetensors`` or its sharded form.

    Files are memory-mapped by safetensors; a tensor is materialised only when asked for. Of a multimodal
    checkpoint only the text model's tensors are shown, under a causal LM's names (:mod:`.multimodal`). A
    quantized tensor (:mod:`.quant`) is shown under its logical name, dequantized to float32 when read;
    ``stored`` reads the tensors as the files hold them.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.check_finite = True  # False: the caller checks for NaN / Inf itself (the loader does, on device)
        self.drop_read = False  # True: pages read with pread leave the page cache (the loader, when memory is short)
        self._handles: dict[str, object] = {}
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or any(
                        not isinstance(f, str) or Path(f).name != f or f in ("", ".", "..") for f in weight_map.values()):
                    raise TypeError("'weight_map' must map tensor names to file names in the folder")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{index} is malformed ({e}): repair or re-download the checkpoint") from None
            self._where = dict(weight_map)
            files = sorted(set(self._where.values()))
        elif (self.folder / SINGLE).is_file():
            files = [SINGLE]
            self._where = None
        else:
            shards = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if shards:
                files, self._where = shards, None
            else:
                pickles = [p for p in PICKLE_NAMES if (self.folder / p).exists()] + [
                    p.name for p in self.folder.glob("*.bin")
                ]
                if pickles:
                    raise UserError(
                        f"'{self.folder}' holds only pickle weights ({pickles[0]}), which are never loaded "
                        "(unsafe): convert them to safetensors first"
                    )
                raise UserError(f"'{self.folder}' has no .safetensors weights: pass a folder with model.safetensors")
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise UserError(f"checkpoint shard '{path}' listed in the index is missing: re-download it")
            self._handles[name] = _SafetensorsFile(path, self)
        if self._where is None:
            self._where = {k: name for name, h in self._handles.items() for k in h.entries}
        elif lost := [k for k, name in self._where.items() if k not in self._handles[name].entries]:
            raise UserError(f"{index} places tensor '{lost[0]}' in {self._where[lost[0]]}, which does not hold it: "
                            "repair or re-download the checkpoint")
        raw = _raw_config(self.folder) if (self.folder / "config.json").is_file() else {}
        self._disk = tensor_names(raw, list(self._where))  # shown name -> name on disk
        self.stored = StoredTensors(self)
        self._quant = self._find_quantized(raw)  # logical name -> its stored parts (:mod:`.quant`)

    def _find_quantized(self, raw: dict) -> dict[str, QuantTensor]:
        """:func:`~.quant.find_quantized`, kept for the same config and unchanged files (a model's loader
        reopens the reader for every layer)."""
        sig = (json.dumps(raw, sort_keys=True, default=str),
               tuple((str(h.path.resolve()), h.stamp) for _, h in sorted(self._handles.items())))
        if sig not in _FOUND:
            if len(_FOUND) >= 4:
                _FOUND.pop(next(iter(_FOUND)))
            _FOUND[sig] = find_quantized(raw, self.stored)
        return _FOUND[sig]

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def keys(self) -> Iterator[str]:
        """Names of the stored tensors (a quantized tensor's parts, not its logical name)."""
        return iter(self._disk)

    def __contains__(self, key: str) -> bool:
        return key in self._disk or key in self._quant

    def quantized(self, key: str) -> QuantTensor | None:
        """The quantized tensor of logical name ``key`` (None: stored as it is)."""
        return self._quant.get(key)

    def file_of(self, key: str) -> str:
        q = self._quant.get(key)
        return self.stored.file_of(next(iter(q.parts.values())) if q else key)

    def shape(self, key: str) -> tuple[int, ...]:
        q = self._quant.get(key)
        return q.shape if q else self.stored.shape(key)

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(np.float32) if key in self._quant else self.stored.dtype(key)

    def get(self, key: str, expect_shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Tensor ``key`` as a NumPy array (bf16 as ml_dtypes.bfloat16), copied out of the file; a quantized
        tensor dequantized to float32."""
        if expect_shape is not None and self.shape(key) != tuple(expect_shape):
            raise UserError(
                f"tensor '{key}' has shape {list(self.shape(key))} but config.json implies {list(expect_shape)}: "
                "the weights do not belong to this config"
            )
        if (q := self._quant.get(key)) is None:
            return self.stored.get(key)
        return self.stored.finite(key, q.dequantize({r: self.stored.get(p) for r, p in q.parts.items()}))

    def get_into(self, key: str, out: np.ndarray) -> None:
        """``out[...] = self.get(key)``, a plain float tensor read straight from the file into ``out``."""
        if key in self._quant:
            out[...] = self.get(key)
        else:
            self.stored.get_into(key, out)

    def get_slice(self, key: str, index) -> np.ndarray:
        """``tensor[index]`` read without loading the whole tensor (e.g. one expert of a fused stack); of a
        quantized stack (3 or more axes) indexed by expert rows, only those rows are read and dequantized."""
        if (q := self._quant.get(key)) is None:
            return self.stored.get_slice(key, index)
        rows = None if isinstance(index, (slice, tuple)) else np.asarray(index)
        if len(q.shape) < 3 or rows is None or rows.ndim > 1 or rows.dtype.kind not in "iu":
            return self.get(key)[index]
        whole = {r: self.stored.get(p) for r, p in q.parts.items() if len(self.stored.shape(p)) < len(q.shape)}

        def row(i: int) -> np.ndarray:  # one row's parts read and dequantized: temporaries of one row only
            return q.dequantize({r: whole[r] if r in whole else self.stored.get_slice(p, i) for r, p in q.parts.items()})

        if rows.ndim == 0:
            return self.stored.finite(key, row(int(rows)))
        out = np.empty((len(rows), *q.shape[1:]), np.float32)
        for j, i in enumerate(rows):
            out[j] = row(int(i))
        return self.stored.finite(key, out)


class StoredTensors:
    """The tensors as stored in the files of a :class:`CheckpointReader` (quantized parts not dequantized)."""

    def __init__(self, reader: CheckpointReader):
        self.r = reader

    def keys(self) -> Iterator[str]:
        return iter(self.r._disk)

    def __contains__(self, key: str) -> bool:
        return key in self.r._disk

    def file_of(self, key: str) -> str:
        return self.r._where[self.r._disk[key]]

    def _entry(self, key: str) -> tuple:
        if key not in self.r._disk:
            raise UserError(f"tensor '{key}' is missing from the checkpoint in '{self.r.folder}': "
                            "the checkpoint is incomplete or not of this model; re-download it")
        disk = self.r._disk[key]
        return self.r._handles[self.r._where[disk]], disk

    def shape(self, key: str) -> tuple[int, ...]:
        h, disk = self._entry(key)
        return h.entries[disk][1]

    def dtype(self, key: str) -> np.dtype:
        h, disk = self._entry(key)
        return np.dtype(h.entries[disk][0])

    def get(self, key: str) -> np.ndarray:
        h, disk = self._entry(key)
        return self.finite(key, np.array(h.view(disk)))

    def get_into(self, key: str, out: np.ndarray) -> None:
        """``out[...] = self.get(key)``: a tensor stored as plain floats is copied straight from the file into
        ``out`` (one pass, no intermediate array)."""
        h, disk = self._entry(key)
        if h.entries[disk][0] not in _PLAIN or h.entries[disk][1] != out.shape:
            out[...] = self.get(key)
            return
        if out.dtype == h.entries[disk][0] and out.flags.c_contiguous:
            h.read_into(disk, out)
        else:
            np.copyto(out, h.view(disk), casting="same_kind")
        self.finite(key, out)

    def get_slice(self, key: str, index) -> np.ndarray:
        h, disk = self._entry(key)
        return self.finite(key, np.array(h.view(disk)[index]))

    def view(self, key: str) -> np.ndarray:
        """Tensor ``key`` as a read-only view of the file's pages (no copy; its pages read ahead), checked
        for NaN / Inf ``VIEW_CHUNK`` bytes at a time, each chunk's pages unmapped once checked: what stays mapped
        is what the caller reads next (:meth:`release` unmaps it again)."""
        self.prefetch(key)
        h, disk = self._entry(key)
        out = h.view(disk)
        if self.r.check_finite and out.size:
            flat, step = out.reshape(-1), max(1, VIEW_CHUNK // out.itemsize)
            for i in range(0, flat.size, step):
                self.finite(key, flat[i:i + step])
                h.advise(disk, mmap.MADV_DONTNEED, i * out.itemsize, (i + step) * out.itemsize)
        return out

    def prefetch(self, key: str) -> None:
        """Start reading tensor ``key``'s pages into the page cache (asynchronous readahead: a cold file is read
        while the caller works on earlier tensors)."""
        h, disk = self._entry(key)
        h.view(disk)
        h.advise(disk, mmap.MADV_WILLNEED)

    def release(self, key: str, start: int = 0, stop: int | None = None) -> None:
        """Unmap the pages of bytes ``start:stop`` of a :meth:`view` of ``key`` (they stay in the page cache; it
        can be read again: the pages map again)."""
        h, disk = self._entry(key)
        h.advise(disk, mmap.MADV_DONTNEED, start, stop)

    def read_raw(self, key: str, out: np.ndarray) -> None:
        """``out`` := tensor ``key``'s bytes as stored (``out``: C-contiguous, of its dtype and element count, any
        shape), with read(2); nothing decoded or checked."""
        h, disk = self._entry(key)
        dtype, shape = h.entries[disk][:2]
        if out.dtype != dtype or out.size != int(np.prod(shape, dtype=np.int64)) or not out.flags.c_contiguous:
            raise ValueError(f"cannot read '{key}' ({np.dtype(dtype).name} {list(shape)}) into {out.dtype} {out.shape}")
        h.read_into(disk, out)

    def finite(self, key: str, arr: np.ndarray) -> np.ndarray:
        """``arr``, after checking that a floating tensor holds no NaN / Inf (:func:`all_finite`)."""
        if self.r.check_finite and not all_finite(arr):
            raise UserError(f"tensor '{key}' in '{self.r.folder}' contains NaN or Inf values: the checkpoint is "
                            "corrupt; re-download it")
        return arr


@functools.cache
def nonfinite_bits(dtype: np.dtype) -> tuple[np.dtype, int, int]:
    """(unsigned view, mask, least bits): a value of float ``dtype`` is NaN / Inf exactly where its bits with
    the sign cleared (``& mask``) are at least ``least`` (IEEE types and the float8 ones alike: their
    non-finite codes are the largest magnitudes)."""
    uint = np.dtype(f"u{dtype.itemsize}")
    bits = 8 * dtype.itemsize
    signed = np.signbit(np.array([1 << (bits - 1)], uint).view(dtype).astype(np.float32))[0]
    mask = (1 << (bits - 1 if signed else bits)) - 1
    if dtype.itemsize > 2:  # float32 / float64: from +inf up
        return uint, mask, int(np.array([np.inf], dtype).view(uint)[0])
    finite = np.isfinite(np.arange(mask + 1, dtype=uint).view(dtype).astype(np.float32))
    return uint, mask, int(np.argmin(finite)) if not finite.all() else mask + 1


def all_finite(arr: np.ndarray, chunk: int = 1 << 18) -> bool:
    """Whether ``arr`` holds no NaN / Inf (True for non-float arrays): its bits tested a cache-sized chunk at
    a time (a mask and a max, vectorised, no float conversion)."""
    if arr.dtype.kind not in "fV" or arr.dtype.itemsize not in (1, 2, 4, 8) or not arr.size:
        return True
    uint, mask, least = nonfinite_bits(arr.dtype)
    flat = np.ascontiguousarray(arr).reshape(-1).view(uint)
    tmp = np.empty(min(chunk, flat.size), uint)
    for i in range(0, flat.size, chunk):
        part = tmp[:min(chunk, flat.size - i)]
        np.bitwise_and(flat[i:i + chunk], mask, out=part)
        if int(part.max()) >= least:
            return False
    return True


class _SafetensorsFile:
    """A safetensors file: header parsed eagerly and checked (once per file version: a model's loader reopens
    the reader for every layer), data read on demand, memory-mapped only when a view is asked for."""

    def __init__(self, path: Path, reader: CheckpointReader | None = None):
        self.path, self.reader = path, reader
        stat = path.stat()
        self.stamp = (stat.st_size, stat.st_mtime_ns)
        self.entries = _header(str(path), *self.stamp)
        self._mm: np.ndarray | None = None  # the file's bytes, mapped read-only on first use
        self._lock = threading.Lock()

    def read_into(self, key: str, out: np.ndarray) -> None:
        """Tensor ``key``'s bytes into the C-contiguous ``out`` with read(2), as a plain file read does (no
        page faults on the mapping)."""
        _, _, offset, nbytes = self.entries[key]
        buf = memoryview(out.reshape(-1).view(np.uint8))
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < nbytes:
                n = os.preadv(fd, [buf[done:]], offset + done)
                if n <= 0:
                    raise UserError(f"'{self.path}' ended early while reading '{key}': re-download it")
                done += n
            if self.reader is not None and self.reader.drop_read:
                os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def view(self, key: str) -> np.ndarray:
        dtype, shape, offset, nbytes = self.entries[key]
        with self._lock:  # the export's helper thread and its writer may both be first
            if self._mm is None:
                with open(self.path, "rb") as f:
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._mm = np.frombuffer(self._map, np.uint8)
        return self._mm[offset : offset + nbytes].view(dtype).reshape(shape)

    def advise(self, key: str, advice: int, start: int = 0, stop: int | None = None) -> None:
        """madvise(``advice``) on the whole pages of the mapping that lie inside bytes ``start:stop`` of tensor
        ``key``."""
        _, _, offset, nbytes = self.entries[key]
        page = mmap.PAGESIZE
        stop = nbytes if stop is None else min(stop, nbytes)
        lo, hi = -(-(offset + start) // page) * page, (offset + stop) // page * page
        if self._mm is not None and hi > lo:
            self._map.madvise(advice, lo, hi - lo)


@functools.lru_cache(maxsize=4096)
def _header(path: str, size: int, mtime_ns: int) -> dict[str, tuple[type, tuple[int, ...], int, int]]:
    """{tensor: (dtype, shape, file offset, bytes)} of the safetensors file ``path`` (of this size and mtime),
    checked against the file's size; UserError if malformed."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"'{path}' is not a valid safetensors file ({e}): re-download it") from None
    header.pop("__metadata__", None)
    entries = {}
    data_len = size - 8 - n
    for key, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"'{path}' has a malformed entry for '{key}': re-download it") from None
        if start < 0 or min(shape, default=0) < 0 or end > data_len \
                or end - start != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise UserError(f"'{path}' is truncated or corrupted (tensor '{key}' lies past its end): re-download it")
        entries[key] = (dtype, shape, 8 + n + start, end - start)
    return entries
