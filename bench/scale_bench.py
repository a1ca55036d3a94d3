"""Peak memory of full-model vs --sequential calibration on a random checkpoint larger than 4 GB.

    python bench/scale_bench.py                        # /tmp/mone_scale_bench, ~4.6 GB, 20 layers
    python bench/scale_bench.py --layers 16 --tokens 2048 --keep-checkpoint

Writes a random OLMoE-layout float32 checkpoint (one safetensors shard per layer, never the
whole model in memory) and random calibration token ids, then runs ``mone-jax calibrate`` twice
under ``/usr/bin/time -v`` (full model, then ``--sequential``) on one CPU device, and reports
each run's peak RSS and wall time, the bound the issue sets for the sequential run (25% of the
checkpoint bytes plus the hidden-state buffer), and whether the two statistics files are
identical. The checkpoint lives in /tmp, never in the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def config(args) -> dict:
    return {
        "model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], "vocab_size": args.vocab,
        "hidden_size": args.hidden, "intermediate_size": args.expert_ffn, "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden // 64, "num_key_value_heads": args.hidden // 64,
        "num_experts": args.experts, "num_experts_per_tok": args.top_k, "norm_topk_prob": False,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "clip_qkv": None, "torch_dtype": "float32", "dtype": "float32",
    }


def write_checkpoint(folder: Path, args) -> int:
    """Random weights, one shard per layer (plus one for embeddings / head); returns the weight bytes."""
    rng = np.random.default_rng(0)
    d, f, E, V = args.hidden, args.expert_ffn, args.experts, args.vocab

    def normal(*shape, std=0.02):
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= std
        return a

    folder.mkdir(parents=True)
    weight_map, total = {}, 0
    shards = [("model-embed.safetensors", lambda: {
        "model.embed_tokens.weight": normal(V, d), "model.norm.weight": np.ones(d, np.float32),
        "lm_head.weight": normal(V, d)})]
    for i in range(args.layers):
        def layer(i=i):
            p = f"model.layers.{i}"
            t = {f"{p}.input_layernorm.weight": np.ones(d, np.float32),
                 f"{p}.post_attention_layernorm.weight": np.ones(d, np.float32),
                 f"{p}.self_attn.q_norm.weight": np.ones(d, np.float32),
                 f"{p}.self_attn.k_norm.weight": np.ones(d, np.float32),
                 f"{p}.mlp.gate.weight": normal(E, d, std=1.0)}
            for n in ("q", "k", "v", "o"):
                t[f"{p}.self_attn.{n}_proj.weight"] = normal(d, d)
            for e in range(E):
                t[f"{p}.mlp.experts.{e}.gate_proj.weight"] = normal(f, d)
                t[f"{p}.mlp.experts.{e}.up_proj.weight"] = normal(f, d)
                t[f"{p}.mlp.experts.{e}.down_proj.weight"] = normal(d, f)
            return t
        shards.append((f"model-layer{i:03d}.safetensors", layer))
    for name, make in shards:
        tensors = make()
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(a.nbytes for a in tensors.values())
        weight_map.update({k: name for k in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config(args), indent=1))
    return total


def timed_run(argv: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    p = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "mone_jax.app.cli", *argv], env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"mone-jax {' '.join(argv)} failed:\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)[1]) * 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", p.stderr)[1]
    secs = sum(float(x) * 60**k for k, x in enumerate(reversed(wall.split(":"))))
    return {"peak_rss": rss, "wall_s": secs}


def same_stats(a: Path, b: Path) -> tuple[bool, float]:
    """(bitwise identical, max relative difference) of two statistics files."""
    from safetensors.numpy import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys():
        return False, float("inf")
    worst = max(float(np.abs(ta[k].astype(np.float64) - tb[k]).max() / max(np.abs(tb[k]).max(), 1e-30))
                for k in ta)
    return all(np.array_equal(ta[k], tb[k]) for k in ta), worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/mone_scale_bench")
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--expert-ffn", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens (sequences of 256)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--keep-checkpoint", action="store_true", help="reuse / keep the generated checkpoint")
    args = ap.parse_args()
    root = Path(args.dir)
    model = root / "model"
    if not (args.keep_checkpoint and (model / "config.json").is_file()):
        shutil.rmtree(root, ignore_errors=True)
        write_checkpoint(model, args)
    ckpt_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    seq_len = 256
    ids = np.random.default_rng(1).integers(0, args.vocab, (max(1, args.tokens // seq_len), seq_len)).astype(np.int32)
    np.save(root / "ids.npy", ids)
    hidden_bytes = ids.size * args.hidden * 4
    common = ["calibrate", str(model), "--calib", str(root / "ids.npy"), "--batch-size", str(args.batch_size), "--quiet"]
    full = timed_run([*common, "--stats-out", str(root / "full.safetensors")])
    seq = timed_run([*common, "--stats-out", str(root / "seq.safetensors"), "--sequential"])
    identical, worst = same_stats(root / "full.safetensors", root / "seq.safetensors")
    bound = 0.25 * ckpt_bytes + hidden_bytes
    gib = 2**30
    print(f"checkpoint: {ckpt_bytes / gib:.2f} GiB, {args.layers} layers (hidden {args.hidden}, {args.experts} experts "
          f"top-{args.top_k}, expert ffn {args.expert_ffn}, vocab {args.vocab}), float32")
    print(f"calibration: {ids.size} tokens; hidden-state buffer {hidden_bytes / gib:.3f} GiB")
    print("| mode | peak RSS (GiB) | % of checkpoint | wall (s) |\n|---|---|---|---|")
    for name, r in (("full model", full), ("--sequential", seq)):
        print(f"| {name} | {r['peak_rss'] / gib:.2f} | {100 * r['peak_rss'] / ckpt_bytes:.0f}% | {r['wall_s']:.0f} |")
    print(f"sequential bound 25% x checkpoint + buffer = {bound / gib:.2f} GiB: "
          f"{'met' if seq['peak_rss'] <= bound else 'NOT met'}")
    print(f"statistics identical: {identical} (max relative difference {worst:.2e})")
    if not args.keep_checkpoint:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
