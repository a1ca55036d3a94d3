"""Hub ids where a model folder is expected (issue 26): resolved through the real ``huggingface_hub`` code path
against a hub cache this test lays out itself (HF_HUB_CACHE in tmp_path, HF_HUB_OFFLINE); the resolved commit is
recorded in the card and the statistics; offline and not cached: one line, exit 2, in seconds."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time

import numpy as np
import pytest
import yaml

from mone_jax.app.cli import main
from mone_jax.app.hub import origin, resolve_models
from mone_jax.base.errors import UserError
from mone_jax.base.stats import Stats

MAIN, V1 = hashlib.sha1(b"main").hexdigest(), hashlib.sha1(b"v1").hexdigest()


@pytest.fixture
def hub_cache(hf_models, tmp_path, monkeypatch):
    """``testorg/tiny`` in huggingface_hub's cache layout (blobs, snapshots of symlinks, refs main and v1), the
    cache at tmp_path / "hub", the hub offline; returns (the source folder, the cache)."""
    from huggingface_hub import constants

    folder, _ = hf_models("olmoe", "a")
    cache = tmp_path / "hub"
    repo = cache / "models--testorg--tiny"
    for commit in (MAIN, V1):
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in sorted(folder.iterdir()):
            blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return folder, cache


def _resolved(model: str, revision: str | None = None) -> str:
    args = argparse.Namespace(model=model, revision=revision)
    resolve_models(args)
    return args.model


def test_hub_ids_and_revisions_resolve_to_cached_snapshots(hub_cache):
    _, cache = hub_cache
    snapshots = cache / "models--testorg--tiny" / "snapshots"
    assert _resolved("testorg/tiny") == str(snapshots / MAIN)
    assert _resolved("testorg/tiny@v1") == _resolved("testorg/tiny", "v1") == str(snapshots / V1)
    assert _resolved(f"testorg/tiny@{MAIN}") == str(snapshots / MAIN)
    assert origin(_resolved("testorg/tiny@v1")) == {"repo": "testorg/tiny", "revision": V1}
    with pytest.raises(UserError, match="give one"):
        _resolved("testorg/tiny@v1", "main")


def test_offline_and_not_cached_is_one_line_in_seconds(hub_cache, capsys):
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main(["inspect", "testorg/absent"]) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'testorg/absent'" in err and "HF_HUB_OFFLINE" in err
    assert main(["inspect", "testorg/tiny", "--revision", "v2"]) == 2  # a revision the cache has no ref of
    assert "'testorg/tiny' at revision 'v2'" in capsys.readouterr().err


def test_prune_a_hub_id_records_its_commit(hub_cache, tmp_path, capsys):
    folder, _ = hub_cache
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 96, (4, 12)).astype(np.int32))
    out, stats_out = tmp_path / "out", tmp_path / "s.safetensors"
    assert main(["prune", "testorg/tiny@v1", "--calib", str(ids), "--keep", "6", "--out", str(out), "--stats-out",
                 str(stats_out), "--quiet"]) == 0
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])["mone_jax"]
    assert (card["source_model"], card["source_revision"]) == ("testorg/tiny", V1)
    meta = Stats.load(stats_out).meta
    assert (meta["source_model"], meta["source_revision"]) == ("testorg/tiny", V1)
    summary = json.loads(capsys.readouterr().out)
    assert (summary["source_model"], summary["source_revision"]) == ("testorg/tiny", V1)
    # the same model as the folder it was cached from
    assert main(["inspect", "testorg/tiny", "--json"]) == 0
    hub = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(folder), "--json"]) == 0
    assert hub == json.loads(capsys.readouterr().out)
