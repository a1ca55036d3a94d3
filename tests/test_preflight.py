"""Memory preflight: a run that cannot fit is refused before any weight is read, naming what would fit; a run
that fits only with a smaller batch gets that batch."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from conftest import build_hf, save_hf, torch

from mone_jax.app import preflight
from mone_jax.app.cli import main
from mone_jax.convert.load import config_of
from mone_jax.convert.reader import CheckpointReader


def float32_bytes(folder) -> int:
    """4 bytes per stored weight, from the safetensors headers alone (independent of the reader)."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        total += sum(4 * int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__")
    return total


def test_float32_that_does_not_fit_is_refused_before_reading(tmp_path, monkeypatch, capsys):
    folder = save_hf(build_hf("olmoe", "a").to(torch.bfloat16), tmp_path / "bf16")  # as most releases are stored
    np.save(tmp_path / "ids.npy", np.zeros((2, 8), np.int32))
    cfg = config_of(folder)
    source = preflight.source_of(folder, cfg)
    assert source.itemsize == 2
    fit = [preflight.need(cfg, dtype, 1, 8, 16, sequential=seq, source=source).total
           for dtype, seq in (("bfloat16", False), ("float32", True))]
    assert max(fit) < preflight.RUNTIME + float32_bytes(folder)  # less than the float32 weights alone
    monkeypatch.setattr(preflight, "host_available", lambda: max(fit))
    reads = []
    for name in ("get", "get_slice", "get_into"):
        monkeypatch.setattr(CheckpointReader, name, lambda self, key, *a, **k: reads.append(key))
    rc = main(["prune", str(folder), "--calib", str(tmp_path / "ids.npy"), "--ratio", "0.25", "--out",
               str(tmp_path / "out"), "--batch-size", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("mone-jax: error: the run needs about")
    assert "--dtype bfloat16" in err[-1] and "--sequential" in err[-1]  # half the bytes fit; one layer fits
    assert reads == [] and not (tmp_path / "out").exists()


def test_a_smaller_batch_is_chosen_when_only_it_fits(hf_models, monkeypatch):
    folder, _ = hf_models("olmoe", "a")
    cfg, seq = config_of(folder), 16
    rep, ex, _ = preflight.model_bytes(cfg, "float32")
    assert abs(rep + ex - float32_bytes(folder)) < 0.01 * (rep + ex)  # the estimate counts the stored weights
    row = preflight.step_bytes(cfg, 1, seq)
    monkeypatch.setattr(preflight, "host_available", lambda: preflight.RUNTIME + rep + ex + int(3.5 * row))
    with pytest.warns(UserWarning, match="using batch size"):
        batch = preflight.check(cfg, "float32", 64, seq, 64 * seq, sequential=False, batch_given=False)
    available = preflight.host_available()
    assert 1 <= batch < 64
    assert preflight.need(cfg, "float32", batch, seq, 0, sequential=False).total <= available
    assert preflight.need(cfg, "float32", batch + 1, seq, 0, sequential=False).total > available
