"""`mone-jax prune` end to end on random checkpoints of real models' dimensions.

    python bench/scale_bench.py --shape olmoe-1b-7b                      # 13.8 GB bf16, hub per-expert layout
    python bench/scale_bench.py --shape deepseek-v3-slice --experts 64   # hidden 7168, MLA, 1 dense + 2 MoE
    python bench/scale_bench.py --shape custom --layers 2 --hidden 64 ... # any OLMoE-layout size
    python bench/scale_bench.py --shape olmoe-1b-7b --layers 2 --modes "" --two-processes

Writes a random checkpoint with the shape's real config into ``--dir`` (under /tmp, never the repository), one
safetensors shard per layer, each tensor streamed from a small pool of random bf16 values (the whole model is
never in memory), and random calibration token ids. Then, in one run, it measures a plain write of as many
bytes as the checkpoint (the rate the exporter is held to) and, just before each mode, a plain read of the
checkpoint files, warm into a reused buffer (the rate the loader is held to) and into fresh memory (the
first-touch bound of a load on CPU; it also leaves the files in the page cache), and after each mode a plain
write of the export's size (the export's reference, taken as close to it as the load allows). It runs
``mone-jax prune CKPT --calib ids.npy --ratio R --out OUT`` in each ``--modes`` (``f32``: the float32 default,
``bf16``: ``--dtype bfloat16``, ``seq``: ``--sequential``, ``seq-bf16``) as a child process, sampling its
resident memory (anonymous and file-backed, from /proc) every 50 ms. For each mode it reports the wall time,
the load rate (checkpoint bytes / load phase, the phase lines' clock), calibration tokens/s, the export rate,
peak anonymous and file-backed memory, and the export's size; a refused run (memory preflight) shows its
one-line refusal instead, a finished one the peak the preflight estimated for it at the batch size it ran, the
bytes it read from disk (page-cache misses: a warm load reads none) and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from child_env import child_env

GB, GIB = 1e9, 2**30
SHAPES = {  # real dimensions (config.json of the hub releases), experts / layers overridable
    "olmoe-1b-7b": dict(family="olmoe", vocab=50304, hidden=2048, layers=16, experts=64, top_k=8, expert_ffn=1024,
                        heads=16),
    "deepseek-v3-slice": dict(family="deepseek_v3", vocab=129280, hidden=7168, layers=3, experts=64, top_k=8,
                              expert_ffn=2048, dense_ffn=18432, heads=128),
}
MODES = {"f32": [], "bf16": ["--dtype", "bfloat16"], "seq": ["--sequential"],
         "seq-bf16": ["--sequential", "--dtype", "bfloat16"]}


def config(s: dict) -> dict:
    common = {"vocab_size": s["vocab"], "hidden_size": s["hidden"], "num_hidden_layers": s["layers"],
              "num_attention_heads": s["heads"], "num_key_value_heads": s["heads"], "num_experts_per_tok": s["top_k"],
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "dtype": "bfloat16"}
    if s["family"] == "olmoe":
        return {**common, "model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], "num_experts": s["experts"],
                "intermediate_size": s["expert_ffn"], "norm_topk_prob": False, "clip_qkv": None}
    return {**common, "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
            "n_routed_experts": s["experts"], "moe_intermediate_size": s["expert_ffn"],
            "intermediate_size": s["dense_ffn"], "first_k_dense_replace": 1, "n_shared_experts": 1,
            "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
            "scoring_func": "sigmoid", "topk_method": "noaux_tc", "q_lora_rank": 1536, "kv_lora_rank": 512,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_interleave": True}


FP8_BLOCK = 128
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}  # DeepSeek-V3's release


def fp8(tensors: list[tuple[str, tuple, str]]) -> list[tuple[str, tuple, str]]:
    """Block-FP8 as DeepSeek-V3 ships it: every projection weight of a decoder layer (not norms, routers,
    embeddings or head) in float8_e4m3fn with a float32 ``_scale_inv`` per 128 x 128 block (partial at the
    edges, e.g. kv_a_proj_with_mqa's 576 rows)."""
    out = []
    for name, shape, fill in tensors:
        if name.endswith("_proj.weight") and fill == "normal":
            out += [(name, shape, "fp8"), (f"{name}_scale_inv", tuple(-(-n // FP8_BLOCK) for n in shape), "scale")]
        else:
            out.append((name, shape, fill))
    return out


def layer_tensors(s: dict, i: int) -> list[tuple[str, tuple, str]]:
    """(name, shape, fill) of decoder layer ``i``; fill: normal (bf16), ones (bf16), zeros (float32); with
    ``s["fp8"]`` the projections in block FP8 (:func:`fp8`)."""
    d, f, E, H, p = s["hidden"], s["expert_ffn"], s["experts"], s["heads"], f"model.layers.{i}"
    out = [(f"{p}.input_layernorm.weight", (d,), "ones"), (f"{p}.post_attention_layernorm.weight", (d,), "ones")]
    if s["family"] == "olmoe":
        out += [(f"{p}.self_attn.{n}_proj.weight", (d, d), "normal") for n in "qkvo"]
        out += [(f"{p}.self_attn.q_norm.weight", (d,), "ones"), (f"{p}.self_attn.k_norm.weight", (d,), "ones")]
        moe, router = True, [(f"{p}.mlp.gate.weight", (E, d), "normal")]
    else:
        a = f"{p}.self_attn"
        out += [(f"{a}.q_a_proj.weight", (1536, d), "normal"), (f"{a}.q_a_layernorm.weight", (1536,), "ones"),
                (f"{a}.q_b_proj.weight", (H * 192, 1536), "normal"),
                (f"{a}.kv_a_proj_with_mqa.weight", (512 + 64, d), "normal"),
                (f"{a}.kv_a_layernorm.weight", (512,), "ones"), (f"{a}.kv_b_proj.weight", (H * 256, 512), "normal"),
                (f"{a}.o_proj.weight", (d, H * 128), "normal")]
        moe = i >= 1
        router = [(f"{p}.mlp.gate.weight", (E, d), "normal"), (f"{p}.mlp.gate.e_score_correction_bias", (E,), "zeros")]
        shared = f"{p}.mlp.shared_experts" if moe else f"{p}.mlp"
        fs = f if moe else s["dense_ffn"]
        out += [(f"{shared}.gate_proj.weight", (fs, d), "normal"), (f"{shared}.up_proj.weight", (fs, d), "normal"),
                (f"{shared}.down_proj.weight", (d, fs), "normal")]
    if moe:
        out += router
        for e in range(E):
            x = f"{p}.mlp.experts.{e}"
            out += [(f"{x}.gate_proj.weight", (f, d), "normal"), (f"{x}.up_proj.weight", (f, d), "normal"),
                    (f"{x}.down_proj.weight", (d, f), "normal")]
    return fp8(out) if s.get("fp8") else out


class Pool:
    """Random N(0, 0.02^2) bf16 values streamed into files from a fixed pool (fast, never a whole tensor)."""

    def __init__(self, n: int = 1 << 24, dtype=ml_dtypes.bfloat16, std: float = 0.02):
        self.vals = (np.random.default_rng(0).standard_normal(n, np.float32) * std).astype(dtype)
        self.raw = self.vals.view(np.uint8)
        self.off = 0

    def write(self, f, nbytes: int) -> None:
        while nbytes:
            self.off = (self.off + 4099 * 2) % (self.raw.size // 2)  # a new start for every chunk
            m = min(nbytes, self.raw.size - self.off)
            f.write(memoryview(self.raw[self.off:self.off + m]))
            nbytes -= m


def write_shard(path: Path, tensors: list[tuple[str, tuple, str]], pool: Pool) -> dict[str, str]:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    stored = {"zeros": ("F32", 4), "scale": ("F32", 4), "fp8": ("F8_E4M3", 1)}
    for name, shape, fill in tensors:
        dtype, size = stored.get(fill, ("BF16", 2))
        n = int(np.prod(shape)) * size
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    one = np.ones(1, ml_dtypes.bfloat16).tobytes()
    scale = np.full(1, 0.02 / 2, np.float32).tobytes()  # e4m3 values of N(0, 2^2) times this: N(0, 0.02^2)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, shape, fill in tensors:
            n = int(np.prod(shape))
            if fill == "normal":
                pool.write(f, 2 * n)
            elif fill == "fp8":
                pool.fp8.write(f, n)
            elif fill == "scale":
                f.write(scale * n)
            else:
                f.write(one * n if fill == "ones" else bytes(4 * n))
    return {name: path.name for name, _, _ in tensors}


def write_checkpoint(folder: Path, s: dict) -> int:
    """The random checkpoint, one shard per layer plus one for the embeddings and head; its weight bytes."""
    folder.mkdir(parents=True)
    pool, weight_map = Pool(), {}
    pool.fp8 = Pool(dtype=ml_dtypes.float8_e4m3fn, std=2.0)
    d, V = s["hidden"], s["vocab"]
    weight_map |= write_shard(folder / "model-embed.safetensors", [
        ("model.embed_tokens.weight", (V, d), "normal"), ("model.norm.weight", (d,), "ones"),
        ("lm_head.weight", (V, d), "normal")], pool)
    for i in range(s["layers"]):
        weight_map |= write_shard(folder / f"model-layer{i:03d}.safetensors", layer_tensors(s, i), pool)
    total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg = config(s) | ({"quantization_config": FP8_CONFIG} if s.get("fp8") else {})
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return total


def plain_read(folder: Path) -> tuple[float, float]:
    """GB/s of reading every safetensors file of ``folder``: warm, into one reused 64 MB buffer (the second of
    two passes), and into fresh memory (each file read whole into a new anonymous mapping, freed after it:
    the first-touch cost a load pays on CPU, where the loaded arrays are that memory). Run just before a
    mode, it also leaves the files in the page cache, as a load finds them."""
    import mmap

    buf = bytearray(64 << 20)
    files = sorted(folder.glob("*.safetensors"))
    rates = []
    for fresh in (False, False, True):
        t, n = time.perf_counter(), 0
        for p in files:
            with open(p, "rb", buffering=0) as f:
                if fresh:
                    size = p.stat().st_size
                    with mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as m:
                        view = memoryview(m)
                        while n_file := f.readinto(view):
                            view, n = view[n_file:], n + n_file
                        view.release()
                while not fresh and (k := f.readinto(buf)):
                    n += k
        rates.append(n / (time.perf_counter() - t) / GB)
    return rates[1], rates[2]


def plain_write(path: Path, nbytes: int) -> float:
    """GB/s of writing ``nbytes`` to a new file (buffered, no fsync: as the export writes)."""
    buf = np.random.default_rng(1).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
    t = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left:
            left -= f.write(buf[:min(left, len(buf))])
    rate = nbytes / (time.perf_counter() - t) / GB
    path.unlink()
    return rate


def watch(procs: list[subprocess.Popen]) -> tuple[threading.Thread, list[dict[str, int]]]:
    """A thread that samples each process's peak anonymous and file-backed resident bytes and the bytes it read
    from disk (/proc) every 50 ms until all have exited, and the peaks it fills (``RssAnon``, ``RssFile``,
    ``read_bytes``, and ``reads``: (seconds since the start, bytes read) samples); join the thread to read them."""
    peaks = [{"RssAnon": 0, "RssFile": 0, "read_bytes": 0, "reads": []} for _ in procs]
    t0 = time.perf_counter()

    def sample():
        while any(p.poll() is None for p in procs):
            for p, peak in zip(procs, peaks):
                try:
                    for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                        k, _, v = line.partition(":")
                        if k in peak:
                            peak[k] = max(peak[k], int(v.split()[0]) * 1024)
                    for line in Path(f"/proc/{p.pid}/io").read_text().splitlines():
                        k, _, v = line.partition(":")
                        if k in peak:  # bytes the process made the disk read (page cache misses)
                            peak[k] = max(peak[k], int(v))
                            peak["reads"].append((time.perf_counter() - t0, int(v)))
                except (OSError, ValueError):
                    pass
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    return th, peaks


def run_prune(argv: list[str]) -> dict:
    """Run ``mone-jax prune`` as a child; wall, phase clock, peak anonymous / file-backed memory, exit and
    output."""
    env = child_env(JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "mone_jax.app.cli", "prune", *argv], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    th, (peak,) = watch([p])
    out, err = p.communicate()
    th.join()
    phases = {m[2]: float(m[1]) for m in re.finditer(r"mone-jax: \[([\d.]+)s\] (\w+):", err)}
    refusal = next((ln for ln in err.splitlines() if ln.startswith("mone-jax: error:")), None)
    return {"rc": p.returncode, "wall_s": time.perf_counter() - t0, "anon": peak["RssAnon"], "file": peak["RssFile"],
            "disk": peak["read_bytes"], "reads": peak["reads"],
            "phases": phases, "summary": json.loads(out) if p.returncode == 0 and out.strip() else None,
            "refusal": refusal, "stderr": err[-3000:]}


def two_processes(model: Path, ids: Path) -> str:
    """Peak anonymous / file-backed GiB of ``calibrate --dtype bfloat16`` in one process, and in each of two
    ``jax.distributed`` processes on 127.0.0.1 (one CPU device each, experts split over them)."""
    import socket

    env = child_env(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")

    def run(extra: list[list[str]]) -> list[str]:
        procs = [subprocess.Popen([sys.executable, "-m", "mone_jax.app.cli", "calibrate", str(model), "--calib",
                                   str(ids), "--dtype", "bfloat16", "--batch-size", "4", "--quiet", *a], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for a in extra]
        th, peaks = watch(procs)
        outs = [p.communicate()[0] for p in procs]
        th.join()
        if any(p.returncode for p in procs):
            raise SystemExit(f"calibrate failed: {outs}")
        return [f"{pk['RssAnon'] / GIB:.2f} / {pk['RssFile'] / GIB:.2f}" for pk in peaks]

    stats = ids.parent / "stats"
    one = run([["--stats-out", f"{stats}-1.safetensors"]])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = run([["--stats-out", f"{stats}-2.safetensors", "--mesh", "data=1,expert=2", "--coordinator",
                f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)] for i in range(2)])
    return f"peak anon / file GiB: one process {one[0]}; each of two processes {', '.join(two)}"


def stored_as_source(model: Path, out: Path) -> str:
    """How many of the export's quantized tensors (float8 weights and their scales) hold the source's stored
    bytes, under the source's name (retained experts mapped back to their original ids by the plan)."""
    from mone_jax.convert.reader import CheckpointReader

    plan = json.loads((out / "mone_plan.json").read_text())["layers"]
    src, dst = CheckpointReader(model).stored, CheckpointReader(out).stored
    same = total = 0
    for key in dst.keys():
        m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(.+)", key)
        name = key if m is None else (f"model.layers.{m[1]}.mlp.experts."
                                      f"{plan[m[1]]['kept'][int(m[2])]}.{m[3]}")
        if dst.dtype(key).itemsize == 1 or key.endswith("_scale_inv"):
            total += 1
            same += name in src and src.get(name).tobytes() == dst.get(key).tobytes()
    return f"{same}/{total} quantized tensors as stored"


def estimate(model: Path, mode: str, batch: int, seq_len: int, tokens: int) -> float:
    """GiB the memory preflight expects ``prune`` in ``mode`` to peak at (its anonymous memory)."""
    from mone_jax.app import preflight
    from mone_jax.convert.families import parse_config
    from mone_jax.convert.reader import read_config

    raw = read_config(model)
    cfg = parse_config(raw)
    dtype = "bfloat16" if "bfloat16" in MODES[mode] else "float32"
    return preflight.need(cfg, dtype, batch, seq_len, tokens, sequential="--sequential" in MODES[mode],
                          source=preflight.source_of(model, cfg)).total / GIB


def row(mode: str, r: dict, ckpt_bytes: int, tokens: int, est: float | None = None,
        read: tuple[float, float] | None = None, write: float | None = None) -> str:
    """One table line; ``read`` (warm, fresh-memory) and ``write``: the plain rates the load and export are
    compared with."""
    gib = f"{r['anon'] / GIB:.2f} | {r['file'] / GIB:.2f}"
    reads = "-" if read is None else f"{read[0]:.2f} / {read[1]:.2f}"
    if r["rc"] != 0:
        why = r["refusal"] or f"exit {r['rc']} (killed?)" + (" " + r["stderr"][-300:] if not r["refusal"] else "")
        return f"| {mode} | {r['wall_s']:.0f} | {reads} | - | - | - | {gib} | - | - | {why} |"
    ph, s = r["phases"], r["summary"]
    load = ckpt_bytes / (ph["compile"] - ph["load"]) / GB if "load" in ph and "compile" in ph else None

    def disk_at(t: float) -> int:  # bytes read from disk by then (the phase clock starts with the process)
        return max((n for at, n in r["reads"] if at <= t), default=0)

    load_disk = disk_at(ph["compile"]) - disk_at(ph["load"]) if load is not None else None
    cal_start = ph.get("compile", ph.get("calibrate"))
    calib = tokens / (ph["plan"] - cal_start) if cal_start is not None and "plan" in ph else None
    export = s["bytes_after"] / (ph["done"] - ph["export"]) / GB if "export" in ph and "done" in ph else None
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    if load is not None and read is not None:
        load_s = f"{load:.2f} ({load / read[0]:.2f}x warm, {load / read[1]:.2f}x fresh)"
    else:
        load_s = fmt(load, ".2f")
    export_s = fmt(export, ".2f") + (f" ({export / write:.2f}x write)" if export is not None and write else "")
    return (f"| {mode} | {r['wall_s']:.0f} | {reads} | {load_s} | {fmt(calib, '.0f')} | {export_s} | {gib} | "
            f"{fmt(est, '.2f')} | {s['bytes_after'] / GB:.2f} | batch {s.get('batch_size')}; disk read "
            f"{r['disk'] / GB:.2f} GB" + (f" ({load_disk / GB:.2f} while loading)" if load_disk is not None else "")
            + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=[*SHAPES, "custom"], default="olmoe-1b-7b")
    ap.add_argument("--dir", default="/tmp/mone_scale_bench")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--experts", type=int)
    ap.add_argument("--hidden", type=int, default=1024, help="custom shape only (so are the next four)")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--expert-ffn", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--tokens", type=int, default=1024, help="calibration tokens (sequences of --seq-len)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--fp8", action="store_true", help="block-FP8 projections, as DeepSeek-V3 ships (needs a "
                    "reader of FP8 checkpoints)")
    ap.add_argument("--modes", default="f32,bf16,seq", help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--two-processes", action="store_true", help="also calibrate (bf16) in one process and in "
                    "two jax.distributed processes splitting the experts, and compare their peak memory")
    ap.add_argument("--keep-checkpoint", action="store_true", help="reuse / keep the generated checkpoint")
    args = ap.parse_args()
    shape = dict(SHAPES.get(args.shape) or dict(family="olmoe", vocab=args.vocab, hidden=args.hidden, layers=2,
                                                experts=32, top_k=args.top_k, expert_ffn=args.expert_ffn))
    shape.update({k: v for k, v in (("layers", args.layers), ("experts", args.experts), ("heads", args.heads)) if v})
    shape.setdefault("heads", max(1, shape["hidden"] // 64))
    shape["fp8"] = args.fp8
    root = Path(args.dir)
    model = root / "model"
    t = time.perf_counter()
    if not (args.keep_checkpoint and (model / "config.json").is_file()):
        shutil.rmtree(root, ignore_errors=True)
        write_checkpoint(model, shape)
    written = time.perf_counter() - t
    ckpt = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    ids = np.random.default_rng(1).integers(0, shape["vocab"], (max(1, args.tokens // args.seq_len), args.seq_len))
    np.save(root / "ids.npy", ids.astype(np.int32))
    write = plain_write(root / "plain-write.bin", ckpt)  # first: its dirty pages would evict the checkpoint's
    print(f"{args.shape}: {shape}; checkpoint {ckpt / GB:.2f} GB ({written:.0f} s to write); "
          f"calibration {ids.size} tokens; ratio {args.ratio}; load average {os.getloadavg()[0]:.1f}")
    print(f"plain write {write:.2f} GB/s; before each mode, a plain read of the checkpoint (warm / into fresh "
          "memory, GB/s); after each, a plain write of the export's size (the export's ratio)")
    print("| mode | wall s | read GB/s warm / fresh | load GB/s | calib tok/s | export GB/s | peak anon GiB | "
          "peak file GiB | preflight GiB | export GB | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    failed = []
    if args.two_processes:
        print(two_processes(model, root / "ids.npy"), flush=True)
    for mode in filter(None, args.modes.split(",")):
        out = root / f"out-{mode}"
        read = plain_read(model)
        r = run_prune([str(model), "--calib", str(root / "ids.npy"), "--ratio", str(args.ratio), "--out", str(out),
                       *MODES[mode]])
        est = estimate(model, mode, r["summary"]["batch_size"], args.seq_len, ids.size) if r["rc"] == 0 else None
        after = plain_write(root / "plain-write.bin", r["summary"]["bytes_after"]) if r["rc"] == 0 else None
        line = row(mode, r, ckpt, ids.size, est, read, after or write)
        line = line[:-2] + f"; load average {os.getloadavg()[0]:.1f} |"
        if args.fp8 and r["rc"] == 0:  # the lossless export rule, checked at real size
            line = line[:-2] + f"; {stored_as_source(model, out)} |"
        print(line, flush=True)
        if r["rc"] != 0 and not r["refusal"]:
            failed.append(mode)
        shutil.rmtree(out, ignore_errors=True)
    if not args.keep_checkpoint:
        shutil.rmtree(root, ignore_errors=True)
    if failed:  # killed or crashed (a refusal with advice is a result)
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
