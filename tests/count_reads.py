"""Runs ``mone-jax`` (argv) in this process, recording what it reads from checkpoints and, after the model
loads, whether any device holds a whole layer's routed experts; writes both as JSON to $COUNT_READS_OUT.
Then, with $EXPORT_PRUNED (a pruned folder), $EXPORT_SOURCE (its source) and $EXPORT_OUT, loads the pruned
folder over all processes' devices (experts split over them) and exports it with ``export_model`` from every
process. Used by tests/test_multihost.py (each process of a two-process run)."""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

import mone_jax.convert.load as load
from mone_jax.app.cli import main
from mone_jax.convert.reader import CheckpointReader

reads: list[tuple[str, int]] = []
whole: list[str] = []


def counted(name: str):
    original = getattr(CheckpointReader, name)

    def read(self, key, *args, **kwargs):
        out = original(self, key, *args, **kwargs)
        got = args[0] if name == "get_into" else out  # get_into fills its argument
        reads.append((key, int(np.asarray(got).nbytes)))
        return out

    return read


def checked_load(*args, **kwargs):
    model = load_hf(*args, **kwargs)
    for i, blk in model.moe_blocks().items():
        full = {tuple(blk.gate_up.shape[1:]), tuple(blk.down.shape[1:])}
        for a in jax.live_arrays():  # every array alive now, model or not
            for shard in a.addressable_shards:
                s = shard.data.shape
                if len(s) == 3 and s[0] >= blk.num_kept and tuple(s[1:]) in full:
                    whole.append(f"layer {i}: {s} on {shard.device}")
    return model


for name in ("get", "get_slice", "get_into"):
    setattr(CheckpointReader, name, counted(name))
load_hf, load.load_hf = load.load_hf, checked_load
code = main(sys.argv[1:])
with open(os.environ["COUNT_READS_OUT"], "w") as f:
    json.dump({"reads": reads, "whole": whole}, f)
if code == 0 and "EXPORT_PRUNED" in os.environ:
    from mone_jax.convert.export import export_model
    from mone_jax.model.sharding import make_mesh

    model = load.load_hf(os.environ["EXPORT_PRUNED"], mesh=make_mesh((1, jax.device_count())), progress=False)
    export_model(model, os.environ["EXPORT_SOURCE"], os.environ["EXPORT_OUT"])
sys.exit(code)
