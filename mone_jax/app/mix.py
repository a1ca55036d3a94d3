"""Balanced calibration mixes: several sources, each with a share of the calibration blocks.

``--calib`` names a mix in one of two ways (a value that names an existing file or folder is always
one source, so paths holding commas or colons still work alone):

- inline, two or more items ``SOURCE:SHARE`` separated by commas, e.g.
  ``code.jsonl:0.5,hf:NAME:CONFIG:0.25,notes.txt:0.25``: SHARE is the text after the item's last
  colon, a positive number; SOURCE is everything before it, any single source ``--calib`` takes
  (except ``self``). A source whose path holds a comma needs a recipe file.
- a recipe file ``*.yaml`` / ``*.yml`` / ``*.mix.json``:
  ``{"sources": [{"source": "code.jsonl", "share": 0.5, "text_field": "content"}, ...]}``
  (``text_field`` optional, default ``--text-field``; relative paths are read from the recipe's folder).

Shares are relative (normalised to sum 1). ``--num-samples`` blocks are split among the sources by
largest remainder, and each source is read exactly as ``--calib SOURCE --num-samples BLOCKS --seed SEED``
reads it alone (tokenized and packed on its own), so the statistics of a mix equal the merged
statistics of its sources calibrated one by one.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mone_jax.base.errors import UserError

_ITEM = re.compile(r"^(?P<source>.+):(?P<share>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")
_RECIPE_SUFFIXES = (".yaml", ".yml", ".mix.json")
META_KEY = "calibration_mix"  # statistics file metadata: the mix as JSON


@dataclass(frozen=True)
class MixSource:
    """One source of a mix: what ``--calib`` would take alone, its share (normalised) and text field."""

    source: str
    share: float
    text_field: str | None = None


def parse_mix(spec: str) -> tuple[MixSource, ...] | None:
    """The sources of a mix ``spec`` (module docstring), or None when ``spec`` is a single source."""
    if spec.lower().endswith(_RECIPE_SUFFIXES):
        return _recipe(Path(spec).expanduser())
    if "," not in spec or spec == "self" or Path(spec).expanduser().exists():
        return None
    items = spec.split(",")
    if bad := next((it for it in items if not _ITEM.match(it)), None):
        raise UserError(f"--calib {spec!r} is no existing path, and as a mix its item {bad!r} lacks a share: "
                        "write SOURCE:SHARE,SOURCE:SHARE (e.g. code.jsonl:0.5,notes.txt:0.5) or use a recipe file")
    return _normalised([(m["source"], float(m["share"]), None) for m in map(_ITEM.match, items)], spec)


def _recipe(path: Path) -> tuple[MixSource, ...]:
    """The sources of a YAML / JSON recipe file; relative paths are taken from the recipe's folder."""
    if not path.is_file():
        raise UserError(f"calibration recipe '{path}' does not exist")
    try:
        if path.name.lower().endswith(".json"):
            raw = json.loads(path.read_text())
        else:
            import yaml

            raw = yaml.safe_load(path.read_text())
    except Exception as e:  # json and yaml raise several types for bad files
        raise UserError(f"cannot read calibration recipe '{path}' ({type(e).__name__}): fix its syntax") from None
    entries = raw.get("sources") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) and isinstance(e.get("source"), str) and isinstance(e.get("share"), (int, float))
            and not isinstance(e.get("share"), bool) and isinstance(e.get("text_field", ""), str) for e in entries):
        raise UserError(f"calibration recipe '{path}' must hold 'sources': a list of {{source: str, share: number"
                        "[, text_field: str]}}")
    items = []
    for e in entries:
        src = e["source"]
        local = not src.startswith("hf:") and src != "self" and not Path(src).expanduser().is_absolute()
        items.append((str(path.parent / src) if local else src, float(e["share"]), e.get("text_field")))
    return _normalised(items, str(path))


def _normalised(items: list[tuple[str, float, str | None]], spec: str) -> tuple[MixSource, ...]:
    if any(not math.isfinite(s) or s <= 0 for _, s, _ in items):
        raise UserError(f"the shares of calibration mix {spec!r} must be positive numbers")
    if any(src == "self" for src, _, _ in items):
        raise UserError(f"calibration mix {spec!r} holds 'self': a mix takes data sources only")
    total = sum(s for _, s, _ in items)
    return tuple(MixSource(src, s / total, field) for src, s, field in items)


def allocate(mix: tuple[MixSource, ...], num_samples: int) -> list[int]:
    """Blocks per source: ``num_samples`` split by share, largest remainder first (ties to the earlier source);
    UserError when a source would get none."""
    exact = [m.share * num_samples for m in mix]
    blocks = [math.floor(x) for x in exact]
    for i in sorted(range(len(mix)), key=lambda i: (blocks[i] - exact[i], i))[:num_samples - sum(blocks)]:
        blocks[i] += 1
    if (i := next((i for i, b in enumerate(blocks) if b == 0), None)) is not None:
        raise UserError(f"--num-samples {num_samples} leaves no block for {mix[i].source!r} (share "
                        f"{mix[i].share:.3g}): raise --num-samples")
    return blocks


def mix_blocks(mix: tuple[MixSource, ...], *, tokenizer_dir, num_samples: int, seq_len: int, seed: int,
               text_field: str, vocab_size: int | None) -> tuple[np.ndarray, list[dict]]:
    """Token blocks [N, seq_len] of every source in turn, and the record of the mix: per source its
    ``source``, ``share``, ``blocks`` and ``tokens``, and for text ``documents`` and ``largest_document_tokens``
    (:func:`~mone_jax.app.data.token_blocks`)."""
    from mone_jax.app.data import token_blocks

    parts, record = [], []
    for m, n in zip(mix, allocate(mix, num_samples)):
        ids, held = token_blocks(m.source, tokenizer_dir=tokenizer_dir, num_samples=n, seq_len=seq_len, seed=seed,
                                 text_field=m.text_field or text_field, vocab_size=vocab_size)
        parts.append(ids)
        record.append({"source": m.source, "share": round(m.share, 6), "blocks": int(ids.shape[0]),
                       "tokens": int(ids.size),
                       **{k: held[k] for k in ("documents", "largest_document_tokens") if k in held}})
    return np.concatenate(parts), record
