"""Hugging Face hub ids where a model folder is expected: ``org/name`` or ``org/name@revision`` (or ``--revision``)
resolved through ``huggingface_hub`` into the cache transformers shares (``HF_HUB_CACHE``), only the files a
model needs; ``HF_HUB_OFFLINE`` (or an unreachable hub) reads the cache alone, and a model it lacks is one error
line within seconds. A folder resolved this way tells where it came from (:func:`origin`): the exported card and
the statistics record the hub id and the commit.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from mone_jax.base.errors import UserError
from mone_jax.base.phases import phase

MODEL_FILES = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "tokenizer*",
               "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model", "*.tiktoken",
               "chat_template.*"]
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
FILE_SUFFIXES = {".safetensors", ".npz", ".npy", ".json", ".txt", ".jsonl", ".parquet", ".yaml"}  # files, not models
COMMIT = re.compile(r"[0-9a-f]{40}")
MODEL_ARGS = ("model", "stats_file", "other")  # the options that name a model folder
PROBE_SECONDS = 2.0  # how long the hub may take to accept a connection before it counts as unreachable


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) is allowed (no ``HF_HUB_OFFLINE``) and accepts a
    connection within ``timeout`` seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def hub_id(spec: str | None) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when ``spec`` is a hub id and no local path, else None."""
    if not spec or Path(spec).expanduser().exists() or Path(spec).suffix in FILE_SUFFIXES:
        return None
    m = HUB_ID.fullmatch(spec)
    return None if m is None else (m["repo"], m["revision"])


def resolve_models(args) -> None:
    """Replace each hub id among ``args``' model options by its snapshot folder in the hub cache."""
    for name in MODEL_ARGS:
        spec = getattr(args, name, None)
        if (found := hub_id(spec)) is not None:
            repo, revision = found
            given = getattr(args, "revision", None)
            if revision and given and revision != given:
                raise UserError(f"'{spec}' names revision '{revision}' and --revision says '{given}': give one")
            setattr(args, name, snapshot(repo, revision or given, progress=getattr(args, "progress", False)))


def snapshot(repo: str, revision: str | None = None, *, progress: bool = False) -> str:
    """The folder of ``repo`` at ``revision`` (default: main) in the hub cache: downloaded (the model's files
    only) when the hub is reachable, else read from the cache."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    online = hub_reachable()
    where = f"'{repo}'" + (f" at revision '{revision}'" if revision else "")
    if online:
        phase("download", f"{where}: its safetensors, config and tokenizer files into {constants.HF_HUB_CACHE}")
    bars_were_off = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=MODEL_FILES, local_files_only=not online)
        phase("model", f"'{repo}' at commit {Path(folder).name}" + ("" if online else " (cached; the hub is offline)"))
        return folder
    except LocalEntryNotFoundError:
        raise UserError(f"{where} is neither a local model folder nor in the Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}), and the hub cannot be reached (offline or HF_HUB_OFFLINE): "
                        "download it where the hub is reachable, or pass a local folder") from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise UserError(f"{where} is neither a local model folder nor a Hugging Face model you can read "
                        f"({type(e).__name__}; a private or gated model needs `hf auth login`)") from None
    except RevisionNotFoundError:
        raise UserError(f"{where}: the model has no such revision (a branch, tag or commit)") from None
    except HFValidationError as e:
        raise UserError(f"'{repo}' is not a model folder or a valid hub id ({e})") from None
    finally:
        if not progress and not bars_were_off:
            enable_progress_bars()


def origin(folder: str | os.PathLike) -> dict[str, str] | None:
    """``{"repo", "revision"}`` (the commit) of a folder in the hub cache (``.../models--ORG--NAME/snapshots/
    COMMIT``), else None."""
    p = Path(os.path.abspath(folder))
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--") and COMMIT.fullmatch(p.name):
        return {"repo": p.parent.parent.name[len("models--"):].replace("--", "/", 1), "revision": p.name}
    return None


def same_revision(folder: str) -> None:
    """On several processes (after ``jax.distributed`` started): every process stops unless all resolved a hub
    model to the same commit (a branch can move between their start-ups)."""
    hub = origin(folder)
    if hub is None:
        return
    import jax

    if jax.process_count() == 1:
        return
    from mone_jax.model.sharding import gather_json

    every = gather_json(hub["revision"])
    if len(set(every)) > 1:
        seen = ", ".join(f"process {i}: {commit}" for i, commit in enumerate(every))
        raise UserError(f"the processes resolved '{hub['repo']}' to different commits ({seen}): pin it on every "
                        "host with --revision COMMIT")
