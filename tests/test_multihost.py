"""Two jax.distributed processes on 127.0.0.1 (gloo CPU collectives) give one process's statistics; each reads
from the checkpoint only its own half of the routed experts, and no device holds a whole layer's experts. A
pruned model spread over both exports as one process exports it, each process writing its own experts."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from checks import assert_stats_equal
from conftest import assert_close_logits, one_device_env, torch_logits

import mone_jax
from mone_jax.app.cli import main
from mone_jax.base.stats import Stats
from mone_jax.calib.calibration import calibrate
from mone_jax.convert.export import export_from_stats, export_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two(argv_of, env_of) -> list[subprocess.CompletedProcess]:
    """Two jax.distributed processes on 127.0.0.1: process i runs the command line ``argv_of(i)`` in the
    environment ``env_of(i)``, given its process id and the shared coordinator."""
    port = free_port()
    procs = [subprocess.Popen([*argv_of(i), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
                               str(i), "--heartbeat-timeout", "10"], env=env_of(i),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(procs, outs)]


def expert_bytes(folder) -> dict[str, int]:
    """Stored bytes of every routed-expert tensor, from the safetensors headers alone."""
    out = {}
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        out |= {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                if re.search(r"\.mlp\.experts\.\d+\.", k)}
    return out


@pytest.mark.slow
def test_two_processes_match_one(hf_models, tmp_path):
    folder, _ = hf_models("olmoe", "a")
    ids = np.random.default_rng(7).integers(0, 96, (12, 16)).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    env = one_device_env(JAX_NUM_CPU_DEVICES="4")  # 2 processes x 4 devices = mesh (1, 8)
    model = mone_jax.load_hf(folder, progress=False)
    ref = calibrate(model, [ids[:6], ids[6:]], progress=False)
    pruned = tmp_path / "pruned"  # 6 of 8 experts: on the 8-device expert axis, 2 padding rows
    export_from_stats(folder, pruned, ref, mone_jax.plan(ref, ratio=0.25))
    counter = str(Path(__file__).with_name("count_reads.py"))
    runs = run_two(lambda i: [sys.executable, counter, "calibrate", str(folder), "--calib", str(tmp_path / "ids.npy"),
                              "--batch-size", "6", "--stats-out", str(tmp_path / f"p{i}.safetensors"), "--mesh",
                              "data=1,expert=8", "--quiet"],
                   lambda i: {**env, "COUNT_READS_OUT": str(tmp_path / f"reads{i}.json"), "EXPORT_PRUNED": str(pruned),
                              "EXPORT_SOURCE": str(folder), "EXPORT_OUT": str(tmp_path / "two")})
    assert [r.returncode for r in runs] == [0, 0], [r.stdout + r.stderr for r in runs]
    assert not (tmp_path / "p1.safetensors").exists()  # process 0 alone writes
    assert_stats_equal(Stats.load(tmp_path / "p0.safetensors"), ref)
    check_shared_export(folder, pruned, tmp_path / "two", tmp_path / "one")
    # each process read its half of the expert bytes (its 4 devices hold experts 4p..4p+3 of 8), the two
    # halves disjoint; and no device held a whole layer's expert stack once the model was loaded
    stored = expert_bytes(folder)
    assert len(stored) == 2 * 8 * 3  # hub layout: 2 layers x 8 experts x gate / up / down
    runs = [json.loads((tmp_path / f"reads{i}.json").read_text()) for i in range(2)]
    read = [{k: n for k, n in r["reads"] if k in stored} for r in runs]
    assert [r["whole"] for r in runs] == [[], []]
    assert all(sum(r.values()) == sum(stored.values()) // 2 for r in read)
    assert not read[0].keys() & read[1].keys() and read[0].keys() | read[1].keys() == stored.keys()
    assert all(read[i][k] == stored[k] for i in range(2) for k in read[i])


def check_shared_export(source, pruned, two, one) -> None:
    """The export written by two processes equals, tensor by tensor, the export of the same pruned model by one;
    process 1 wrote only the routed experts its devices hold, into its own shard files; transformers loads it and
    agrees with the model."""
    torch = pytest.importorskip("torch")
    import transformers
    from safetensors.numpy import load_file

    model = mone_jax.load_hf(pruned, progress=False)
    export_model(model, source, one)
    assert main(["verify", str(two)]) == 0
    got = {k: v for p in two.glob("*.safetensors") for k, v in load_file(p).items()}
    want = {k: v for p in one.glob("*.safetensors") for k, v in load_file(p).items()}
    assert got.keys() == want.keys() and all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k])
                                             for k in want)
    assert json.loads((two / "config.json").read_text()) == json.loads((one / "config.json").read_text())
    index = json.loads((two / "model.safetensors.index.json").read_text())["weight_map"]
    by_process = [{k for k, f in index.items() if f.startswith(f"model-p{i:05d}-")} for i in range(2)]
    assert by_process[0] | by_process[1] == want.keys() and not by_process[0] & by_process[1]
    # one row per device: process 1's 4 devices hold rows 4..7, i.e. retained experts 4 and 5 and 2 padding rows
    assert by_process[1] == {k for k in want if (m := re.search(r"\.mlp\.experts\.(\d+)\.", k)) and int(m[1]) >= 4}
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, (2, 8))
    hf = transformers.AutoModelForCausalLM.from_pretrained(two, trust_remote_code=True, dtype=torch.float32).eval()
    assert_close_logits(np.asarray(model(ids)), torch_logits(hf, ids))


@pytest.mark.slow
def test_processes_that_resolved_a_hub_id_to_different_commits_stop(hf_models, tmp_path):
    """Each process resolves `testorg/tiny` in its own hub cache, whose main points at another commit (a push
    between the hosts' start-ups): both refuse with one line naming both commits, and nothing is written."""
    folder, _ = hf_models("olmoe", "a")
    np.save(tmp_path / "ids.npy", np.random.default_rng(7).integers(0, 96, (4, 16)).astype(np.int32))
    commits = ["a" * 40, "b" * 40]
    for i, commit in enumerate(commits):
        repo = tmp_path / f"hub{i}" / "models--testorg--tiny"
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    env = one_device_env(JAX_NUM_CPU_DEVICES="2", HF_HUB_OFFLINE="1")
    runs = run_two(lambda i: [sys.executable, "-m", "mone_jax.app.cli", "calibrate", "testorg/tiny", "--calib",
                              str(tmp_path / "ids.npy"), "--stats-out", str(tmp_path / "s.safetensors"), "--quiet"],
                   lambda i: {**env, "HF_HUB_CACHE": str(tmp_path / f"hub{i}")})
    errs = [r.stderr for r in runs]
    assert [r.returncode for r in runs] == [2, 2], errs
    for err in errs:
        assert err.count("\n") == 1 and f"process 0: {commits[0]}, process 1: {commits[1]}" in err and "--revision" in err
    assert not (tmp_path / "s.safetensors").exists()
