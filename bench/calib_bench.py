"""Calibration benchmark: mone-jax against the PyTorch way, on a random MoE checkpoint.

    python bench/calib_bench.py                       # hidden 1024, 64 experts top-8, 4 layers
    python bench/calib_bench.py --dtypes float32 --reps 7 --json out.json

In one process, on the same transformers checkpoint (written to a temporary folder):

- mone-jax calibration (``mone_jax.calibrate``) per dispatch implementation and dtype;
- PyTorch: transformers' forward with the experts modules' forward replaced by one that also
  accumulates the same per-expert statistics (raw per-expert outputs are not visible to a plain
  hook), LM head skipped as in ours; plus the full forward with logits;
- the dense matmul rate of a large ``jnp.dot`` (the roofline) and of ``torch.mm``;
- the MoE blocks' forward time of MoNE-pruned models (25% / 50% of experts novices) against the
  original's, and whole-forward time.

Repetitions of all timed configurations are interleaved (rep 1 of each, then rep 2 ...) so that
machine load hits them alike; medians are reported. Useful FLOPs count routed (token, expert)
pairs, attention (projections and the causal half of the score/value products) and, only where
it is computed, the LM head.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
from child_env import child_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="olmoe", choices=["olmoe", "qwen3_moe"])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--moe-inter", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: as many as query heads")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="sequences per calibration batch")
    ap.add_argument("--tokens", type=int, default=8192, help="calibration tokens per timed pass")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--impls", default=None, help="comma list; default: the platform's default dispatch")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--slow-tokens", type=int, default=2048,
                    help="tokens per pass for dispatch implementations that are not the platform's default")
    ap.add_argument("--prune-ratios", default="0.25,0.5")
    ap.add_argument("--matmul-n", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPU cores)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--cache-dir", default=None, help="JAX persistent compilation cache folder")
    ap.add_argument("--json", default="calib_bench.json", help="where to write the results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--whole-process", action="store_true",
                    help="time `mone-jax calibrate` and bench/torch_calibrate.py as separate processes, alternating, "
                         "for each of --token-counts (first run with an empty compile cache, then a rerun)")
    ap.add_argument("--token-counts", default="4096,65536,262144", help="--whole-process: calibration tokens per run")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- checkpoint + FLOPs


def build_checkpoint(args, folder: Path):
    """A random transformers MoE model of the requested shape, saved to ``folder``."""
    import torch
    import transformers

    heads = args.hidden // args.head_dim
    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=heads, num_key_value_heads=args.kv_heads or heads,
                  num_experts=args.experts, num_experts_per_tok=args.top_k,
                  max_position_embeddings=max(args.seq_len, 128), tie_word_embeddings=False)
    if args.family == "olmoe":
        cfg = transformers.OlmoeConfig(intermediate_size=args.moe_inter, norm_topk_prob=False, **common)
    else:
        cfg = transformers.Qwen3MoeConfig(moe_intermediate_size=args.moe_inter, intermediate_size=4 * args.hidden,
                                          head_dim=args.head_dim, norm_topk_prob=True, **common)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(folder)
    return model


def flops_per_pass(cfg, n_seq: int, seq_len: int) -> dict[str, float]:
    """Useful FLOPs of one calibration pass over ``n_seq`` sequences of ``seq_len`` tokens."""
    d, H, KV, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    tokens = n_seq * seq_len
    moe = sum(cfg.moe_layers)
    experts = tokens * moe * cfg.top_k * 6 * d * cfg.moe_intermediate_size
    dense = tokens * (cfg.num_layers - moe) * 6 * d * cfg.intermediate_size
    proj = tokens * cfg.num_layers * 2 * d * (2 * H * D + 2 * KV * D)
    scores = n_seq * cfg.num_layers * 4 * H * D * seq_len * (seq_len + 1) / 2
    return {"experts": experts + dense, "attention": proj + scores, "lm_head": tokens * 2 * d * cfg.vocab_size}


# ----------------------------------------------------------------------------- measurement helpers


class PeakRSS:
    """Samples this process's resident set size in a thread; ``peak`` since the last ``reset``."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.current())

    def reset(self) -> int:
        self.peak = self.current()
        return self.peak

    def close(self) -> None:
        self._stop.set()
        self._t.join()


def interleaved(runs: dict[str, Callable[[], object]], reps: int, warmup: int, rss: PeakRSS) -> dict[str, dict]:
    """Time every callable ``reps`` times, round-robin, after ``warmup`` untimed calls each; record the
    first call's time, peak RSS (and its rise during a call) and compilations during timed calls."""
    from mone_jax.base.compile_cache import CompileClock

    out = {k: {"times": [], "first_s": None, "rss_peak_gb": 0.0, "rss_delta_gb": 0.0, "compiles": 0} for k in runs}
    compiles = CompileClock()

    def call(k: str, fn: Callable) -> float:
        base, n = rss.reset(), compiles.programs
        t = time.perf_counter()
        fn()
        t = time.perf_counter() - t
        o = out[k]
        o["rss_peak_gb"] = max(o["rss_peak_gb"], rss.peak / 2**30)
        o["rss_delta_gb"] = max(o["rss_delta_gb"], (rss.peak - base) / 2**30)
        o["compiles"] += compiles.programs - n
        return t

    with compiles:
        for k, fn in runs.items():
            for _ in range(warmup):
                t = call(k, fn)
                out[k]["first_s"] = out[k]["first_s"] or t
        for v in out.values():
            v["compiles"] = 0
        for _ in range(reps):
            for k, fn in runs.items():
                out[k]["times"].append(call(k, fn))
    for v in out.values():
        v["median_s"] = float(np.median(v["times"])) if v["times"] else float("nan")
        v["best_s"] = float(np.min(v["times"])) if v["times"] else float("nan")
    return out


def matmul_runs(n: int, with_torch: bool) -> dict[str, tuple[Callable[[], object], float]]:
    """Callables computing an n x n x n product (jnp.dot f32 and bf16, torch.mm f32) and its FLOPs."""
    import jax
    import jax.numpy as jnp

    runs = {}
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    for dt in (jnp.float32, jnp.bfloat16):
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dt)
        runs[f"matmul jax {jnp.dtype(dt).name}"] = (lambda a=a: dot(a, a).block_until_ready(), 2.0 * n**3)
    if with_torch:
        import torch

        t = torch.randn(n, n)
        runs["matmul torch float32"] = (lambda: torch.mm(t, t), 2.0 * n**3)
    return runs


# ----------------------------------------------------------------------------- the PyTorch way


class TorchStats:
    """Per-expert statistics gathered inside transformers' experts modules (float64 Chan merge).

    Each experts module's forward is replaced by transformers' sorted grouped product (its CPU
    default) that also reduces the raw per-expert outputs before they are weighted and summed.
    """

    def __init__(self, hf_model):
        import torch

        self.torch = torch
        self.acc: dict[int, dict] = {}
        for i, layer in enumerate(hf_model.model.layers):
            mod = getattr(layer.mlp, "experts", None)
            if mod is not None:
                mod.forward = types.MethodType(self._forward(i), mod)

    def reset(self) -> None:
        self.acc = {}

    def _forward(self, layer: int):
        torch = self.torch
        from transformers.integrations.moe import _grouped_linear

        def forward(mod, hidden, top_k_index, top_k_weights):
            T, k = top_k_index.shape
            E = mod.num_experts
            ids, order = torch.sort(top_k_index.reshape(-1))
            x = hidden[order // k]
            w = top_k_weights.reshape(-1)[order]
            counts = torch.bincount(ids, minlength=E)
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            h = _grouped_linear(x, mod.gate_up_proj, offs, is_transposed=getattr(mod, "is_transposed", False))
            gate, up = h.chunk(2, dim=-1)
            y = _grouped_linear(mod.act_fn(gate) * up, mod.down_proj, offs,
                                is_transposed=getattr(mod, "is_transposed", False))
            yf = y.float()
            n = counts.to(torch.float64)
            s = torch.zeros(E, yf.shape[1]).index_add_(0, ids, yf)
            mean = s / counts.clamp(min=1)[:, None]
            dev = yf - mean[ids]
            m2 = torch.zeros_like(s).index_add_(0, ids, dev * dev)
            wf = w.float()
            reap = torch.zeros(E).index_add_(0, ids, wf * yf.norm(dim=-1))
            wsum = torch.zeros(E).index_add_(0, ids, wf)
            self._merge(layer, n, wsum.double(), mean.double(), m2.double(), reap.double())
            out = torch.empty_like(y)
            out[order] = y * w[:, None].to(y.dtype)
            return out.view(T, k, -1).sum(1).to(hidden.dtype)

        return forward

    def _merge(self, layer, n, wsum, mean, m2, reap) -> None:
        a = self.acc.get(layer)
        if a is None:
            self.acc[layer] = dict(count=n, weight_sum=wsum, mean=mean, m2=m2, reap=reap)
            return
        tot = a["count"] + n
        safe = tot.clamp(min=1)[:, None]
        delta = mean - a["mean"]
        a["m2"] = a["m2"] + m2 + delta**2 * (a["count"][:, None] * n[:, None] / safe)
        a["mean"] = a["mean"] + delta * (n[:, None] / safe)
        a["count"], a["weight_sum"], a["reap"] = tot, a["weight_sum"] + wsum, a["reap"] + reap


def torch_pass(hf_model, batches: list[np.ndarray], stats: TorchStats, logits: bool) -> None:
    import torch

    stats.reset()
    with torch.inference_mode():
        for ids in batches:
            t = torch.as_tensor(ids, dtype=torch.long)
            if logits:
                hf_model(t, use_cache=False)
            else:
                hf_model.model(t, use_cache=False)


# ----------------------------------------------------------------------------- mone-jax side


def moe_inputs(model, ids) -> list:
    """The inputs of every MoE block of ``model`` on token ids ``ids`` (recorded while tracing)."""
    import jax
    from flax import nnx

    from mone_jax.model.causal_lm import MoEBlock

    graphdef, state = nnx.split(model)
    seen: list = []
    call = MoEBlock.__call__

    def record(self, x, *a, **kw):
        seen.append(x)
        return call(self, x, *a, **kw)

    def run(state, ids):
        seen.clear()
        nnx.merge(graphdef, state).hidden_states(ids)
        return list(seen)

    MoEBlock.__call__ = record
    try:
        return jax.jit(run)(state, ids)
    finally:
        MoEBlock.__call__ = call


def moe_only_fn(model):
    """Jitted forward of just the MoE blocks (router, experts, novices) on given inputs."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, xs):
        m = nnx.merge(graphdef, state)
        return [blk(x, None, m.impl, m.block)[0] for blk, x in zip(m.moe_blocks().values(), xs)]

    return lambda xs: jax.block_until_ready(run(state, xs))


def forward_fn(model):
    """Jitted forward (hidden states only, no stats) of ``model``."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids):
        return nnx.merge(graphdef, state).hidden_states(ids)[0]

    return lambda ids: jax.block_until_ready(run(state, ids))


def compare_stats(ours, theirs: dict) -> dict:
    """Largest relative mean / variance difference over layer-experts whose counts agree."""
    worst_mean = worst_var = 0.0
    flips = 0
    for i, t in theirs.items():
        s = ours.layers[i]
        tc = np.asarray(t["count"]).astype(np.int64)
        agree = s.count == tc
        flips += int(np.abs(s.count - tc).sum()) // 2
        tm, tv = np.asarray(t["mean"]), np.asarray(t["m2"]) / np.maximum(tc - 1, 1)[:, None]
        sc = np.abs(tm).max() + 1e-30
        worst_mean = max(worst_mean, float(np.abs(s.mean - tm)[agree].max(initial=0) / sc))
        vs = np.abs(tv).max() + 1e-30
        worst_var = max(worst_var, float(np.abs(s.var - tv)[agree & (tc > 1)].max(initial=0) / vs))
    return {"max_rel_mean_diff": worst_mean, "max_rel_var_diff": worst_var, "routing_flips": flips}


# ----------------------------------------------------------------------------- main


def jax_runs(args, models: dict, batches: list, slow_batches: list, stats_out: dict) -> tuple[dict, dict]:
    """Timed mone-jax calibration passes per dtype and dispatch implementation (results to ``stats_out``)."""
    import mone_jax
    from mone_jax.model.moe import default_impl

    cfg = next(iter(models.values())).config
    runs, meta = {}, {}
    for dt, model in models.items():
        for impl in args.impl_list:
            data = batches if impl == default_impl() else slow_batches
            key = f"jax {impl} {dt}"

            def go(m=model, impl=impl, data=data, key=key):
                m.impl = impl
                stats_out[key] = mone_jax.calibrate(m, data, progress=False)

            n = sum(b.shape[0] for b in data)
            f = flops_per_pass(cfg, n, args.seq_len)
            runs[key] = go
            meta[key] = {"framework": "jax", "impl": impl, "dtype": dt, "tokens": n * args.seq_len,
                         "flops": f["experts"] + f["attention"]}
    return runs, meta


def torch_runs(args, hf, batches: list, fl: dict) -> tuple[dict, dict, dict]:
    """Timed PyTorch passes per dtype (with the LM head too in float32) and {dtype: (model, TorchStats)}."""
    import torch

    copies = {dt: hf if dt == "float32" else copy.deepcopy(hf).to(getattr(torch, dt)) for dt in args.dtype_list}
    models = {dt: (m, TorchStats(m)) for dt, m in copies.items()}  # copy first: TorchStats patches modules
    runs, meta = {}, {}
    for dt, (m, st) in models.items():
        for logits in (False, True) if dt == "float32" else (False,):
            key = f"torch {'forward' if logits else 'base'}+stats {dt}"
            runs[key] = lambda m=m, st=st, logits=logits: torch_pass(m, batches, st, logits)
            meta[key] = {"framework": "torch", "impl": "grouped_mm+stats" + (" +lm_head" if logits else ""),
                         "dtype": dt, "tokens": sum(b.shape[0] for b in batches) * args.seq_len,
                         "flops": fl["experts"] + fl["attention"] + (fl["lm_head"] if logits else 0)}
    return runs, meta, models


def summarize(timings: dict, meta: dict, roof: float) -> list[dict]:
    """One row per calibration configuration: times, tokens/s, useful GFLOP/s, share of the roofline, RSS."""
    rows = []
    for key, t in timings.items():
        m = meta[key]
        if m["impl"] == "dense matmul":
            continue
        gflops = m["flops"] / t["median_s"] / 1e9
        rows.append({"name": key, **m, "median_s": t["median_s"], "best_s": t["best_s"], "times_s": t["times"],
                     "first_call_s": t["first_s"], "tokens_per_s": m["tokens"] / t["median_s"], "gflops": gflops,
                     "frac_of_f32_matmul": gflops / roof, "rss_peak_gb": t["rss_peak_gb"],
                     "rss_delta_gb": t["rss_delta_gb"], "compiles_in_timed_reps": t["compiles"]})
    return rows


def ratios(rows: list[dict], args) -> dict[str, dict[str, float]]:
    """Time ratios PyTorch / mone-jax (= tokens/s ours / theirs) per configuration, of medians and of bests."""
    by = {r["name"]: r for r in rows}
    out = {}
    for dt in args.dtype_list:
        for impl in args.impl_list:
            ours = by.get(f"jax {impl} {dt}")
            for way in ("base", "forward"):
                theirs = by.get(f"torch {way}+stats {dt}")
                if ours and theirs:
                    out[f"{impl} {dt} / torch {way}+stats"] = {
                        "median": ours["tokens_per_s"] / theirs["tokens_per_s"],
                        "best": ours["tokens"] / ours["best_s"] / (theirs["tokens"] / theirs["best_s"])}
    return out


def run(args) -> dict:
    import jax

    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    import mone_jax
    from mone_jax.model.moe import default_impl

    args.impl_list = args.impls.split(",") if args.impls else [default_impl()]
    args.dtype_list = args.dtypes.split(",")
    with_torch = not args.no_torch
    if with_torch:
        import torch

        torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    rss = PeakRSS()
    n_seq = max(1, args.tokens // args.seq_len)
    ids = np.random.default_rng(args.seed).integers(0, args.vocab, (n_seq, args.seq_len)).astype(np.int32)
    batches = [ids[i:i + args.batch] for i in range(0, n_seq, args.batch)]
    n_slow = max(1, min(n_seq, args.slow_tokens // args.seq_len))
    slow_batches = [ids[i:min(i + args.batch, n_slow)] for i in range(0, n_slow, args.batch)]
    res: dict = {"config": {k: v for k, v in vars(args).items() if not k.endswith("_list")}, "platform": {
        "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "cpu_cores": len(os.sched_getaffinity(0)), "load_avg": os.getloadavg(), "jax": jax.__version__,
        "torch": torch.__version__ if with_torch else None,
        "torch_threads": torch.get_num_threads() if with_torch else None,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }}
    with tempfile.TemporaryDirectory(prefix="mone-bench-") as tmp:
        hf = build_checkpoint(args, Path(tmp))
        models = {dt: mone_jax.load_hf(tmp, dtype=dt, progress=False) for dt in args.dtype_list}
        fl = flops_per_pass(next(iter(models.values())).config, n_seq, args.seq_len)
        res["flops_per_pass"] = fl
        stats_out: dict = {}
        runs, meta = jax_runs(args, models, batches, slow_batches, stats_out)
        torch_models: dict = {}
        if with_torch:
            t_runs, t_meta, torch_models = torch_runs(args, hf, batches, fl)
            runs, meta = {**runs, **t_runs}, {**meta, **t_meta}
        for key, (fn, flops) in matmul_runs(args.matmul_n, with_torch).items():
            runs[key] = fn
            meta[key] = {"framework": key.split()[1], "impl": "dense matmul", "dtype": key.split()[2], "tokens": 0,
                         "flops": flops}
        timings = interleaved(runs, args.reps, args.warmup, rss)
        res["matmul_gflops"] = {k: m["flops"] / timings[k]["median_s"] / 1e9 for k, m in meta.items()
                                if m["impl"] == "dense matmul"}
        res["calibration"] = summarize(timings, meta, res["matmul_gflops"]["matmul jax float32"])
        res["ratios"] = ratios(res["calibration"], args)
        f32 = f"jax {default_impl()} float32"
        if "float32" in torch_models and f32 in stats_out:
            m, st = torch_models["float32"]
            torch_pass(m, batches, st, logits=False)
            res["parity_vs_torch_float32"] = compare_stats(stats_out[f32], st.acc)
        res["pruned"] = pruned_costs(args, models, stats_out, rss)
    if jax.default_backend() != "cpu":
        res["device_peak_bytes"] = {str(d): (d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.devices()}
    res["rss_max_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    res["platform"]["load_avg_end"] = os.getloadavg()
    rss.close()
    return res


def pruned_costs(args, models: dict, stats_out: dict, rss: PeakRSS) -> list[dict]:
    """MoE-block and whole-forward time of MoNE-pruned models relative to the original (f32 if measured)."""
    import jax.numpy as jnp

    import mone_jax
    from mone_jax.model.moe import default_impl

    impl = default_impl()
    dt = "float32" if "float32" in models else next(iter(models))
    if f"jax {impl} {dt}" not in stats_out:
        return []
    model, stats = models[dt], stats_out[f"jax {impl} {dt}"]
    model.impl = impl
    B = min(args.batch, max(1, args.tokens // args.seq_len))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, args.vocab, (B, args.seq_len)), jnp.int32)
    xs = moe_inputs(model, ids)
    variants, share = {"original": model}, {"original": 1.0}
    for r in (float(x) for x in args.prune_ratios.split(",") if x):
        plan = mone_jax.plan(stats, ratio=r)
        variants[f"pruned {r:.0%}"] = mone_jax.prune(model, stats, plan)
        kept = sum(int(stats.layers[i].count[list(lp.kept)].sum()) for i, lp in plan.layers.items())
        share[f"pruned {r:.0%}"] = kept / sum(int(s.count.sum()) for s in stats.layers.values())
    runs: dict[str, Callable] = {}
    for name, m in variants.items():
        moe, fwd = moe_only_fn(m), forward_fn(m)
        runs[f"{name} moe"] = lambda moe=moe: moe(xs)
        runs[f"{name} forward"] = lambda fwd=fwd: fwd(ids)
    t = interleaved(runs, args.reps, max(1, args.warmup), rss)
    out = []
    for name in variants:
        moe, fwd = t[f"{name} moe"]["median_s"], t[f"{name} forward"]["median_s"]
        out.append({"model": name, "kept_pair_share": share[name], "moe_s": moe, "forward_s": fwd,
                    "moe_vs_original": moe / t["original moe"]["median_s"],
                    "forward_vs_original": fwd / t["original forward"]["median_s"]})
    return out


def print_table(res: dict) -> None:
    p = res["platform"]
    mm = res["matmul_gflops"]
    print(f"\nplatform: {p['backend']}, {p['cpu_cores']} cores, load {p['load_avg'][0]:.2f} -> "
          f"{p['load_avg_end'][0]:.2f}; jax {p['jax']}, torch {p['torch']} ({p['torch_threads']} threads); "
          f"GLIBC_TUNABLES={p['glibc_tunables'] or '-'}")
    print("dense matmul GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in mm.items()))
    print(f"\n{'calibration pass':<30}{'tokens':>7}{'median s':>10}{'tok/s':>9}{'GFLOP/s':>9}{'% f32 mm':>9}"
          f"{'1st s':>7}{'RSS GB':>8}{'+GB':>6}{'jit':>4}")
    for r in res["calibration"]:
        print(f"{r['name']:<30}{r['tokens']:>7}{r['median_s']:>10.3f}{r['tokens_per_s']:>9.0f}{r['gflops']:>9.1f}"
              f"{100 * r['frac_of_f32_matmul']:>8.0f}%{r['first_call_s'] or 0:>7.1f}{r['rss_peak_gb']:>8.2f}"
              f"{r['rss_delta_gb']:>6.2f}{r['compiles_in_timed_reps']:>4}")
    if res.get("ratios"):
        print(f"\n{'tokens/s, ours / PyTorch':<46}{'median':>8}{'best':>8}")
        for k, v in res["ratios"].items():
            print(f"  {k:<44}{v['median']:7.2f}x{v['best']:7.2f}x")
    if res.get("parity_vs_torch_float32"):
        print("parity vs torch (f32): " + ", ".join(f"{k} {v:.3g}" for k, v in res["parity_vs_torch_float32"].items()))
    if res.get("pruned"):
        print(f"\n{'model':<14}{'routed pairs kept':>18}{'MoE blocks s':>13}{'vs orig':>9}{'forward s':>11}"
              f"{'vs orig':>9}")
        for r in res["pruned"]:
            print(f"{r['model']:<14}{r['kept_pair_share']:>18.2f}{r['moe_s']:>13.4f}{r['moe_vs_original']:>9.2f}"
                  f"{r['forward_s']:>11.4f}{r['forward_vs_original']:>9.2f}")
    print(f"\npeak RSS of the whole process: {res['rss_max_gb']:.2f} GB")
    for dev, peak in res.get("device_peak_bytes", {}).items():
        print(f"peak device memory {dev}: {(peak or 0) / 2**30:.2f} GB")


def whole_process(args) -> dict:
    """Whole-process wall times (start, load, compile, calibration, write) per token count: mone-jax's first
    run (empty compilation cache), its rerun (the cache the first run filled) and the PyTorch way."""
    import subprocess

    counts = [int(x) for x in args.token_counts.split(",")]
    rows = {n: {"mone-jax first": [], "mone-jax rerun": [], "pytorch": [], "compile first": [],
                "compile rerun": []} for n in counts}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="mone-bench-") as tmp:
        tmp = Path(tmp)
        build_checkpoint(args, tmp / "model")
        n_seq = max(counts) // args.seq_len
        np.save(tmp / "ids.npy", np.random.default_rng(args.seed).integers(0, args.vocab, (n_seq, args.seq_len))
                .astype(np.int32))
        env = child_env(drop=("JAX_COMPILATION_CACHE_DIR",))

        def timed(cmd: list[str]) -> tuple[float, str]:
            t = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            return time.perf_counter() - t, proc.stderr

        for rep in range(args.reps):
            for n in counts:
                common = [str(tmp / "model"), "--calib", str(tmp / "ids.npy"), "--num-samples", str(n // args.seq_len),
                          "--seq-len", str(args.seq_len), "--batch-size", str(args.batch)]
                cache = tmp / f"xla-{rep}-{n}"
                for kind in ("first", "rerun"):
                    took, err = timed([sys.executable, "-m", "mone_jax.app.cli", "calibrate", *common, "--stats-out",
                                       str(tmp / "s.safetensors"), "--compile-cache", str(cache)])
                    rows[n][f"mone-jax {kind}"].append(took)
                    rows[n][f"compile {kind}"].append(_compile_seconds(err))
                took, _ = timed([sys.executable, str(REPO / "bench" / "torch_calibrate.py"), *common,
                                 "--stats-out", str(tmp / "t.npz")])
                rows[n]["pytorch"].append(took)
                loads.append(os.getloadavg()[0])
                print(f"rep {rep + 1}, {n} tokens: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in rows[n].items()) +
                      f" (load {loads[-1]:.1f})", flush=True)
        parity = _process_parity(tmp / "s.safetensors", tmp / "t.npz")  # the last token count's runs
    med = {n: {k: float(np.median(v)) for k, v in r.items()} for n, r in rows.items()}
    return {"config": {k: v for k, v in vars(args).items()}, "load_avg": loads, "runs": rows, "median": med,
            "matmul_gflops": matmul_rates(args), "parity_vs_torch_float32": parity}


def _process_parity(ours: Path, theirs: Path) -> dict:
    """:func:`compare_stats` of the statistics files the two processes wrote."""
    from mone_jax.base.stats import Stats

    with np.load(theirs) as z:
        acc: dict[int, dict] = {}
        for key in z.files:
            _, layer, field = key.split(".")
            acc.setdefault(int(layer), {})[field] = z[key]
    return compare_stats(Stats.load(ours), acc)


def matmul_rates(args) -> dict[str, float]:
    """Dense f32 GFLOP/s of ``jnp.dot`` and ``torch.mm`` (interleaved, this process): the ceiling each tool's
    calibration rate follows, so the ratio of the two explains most of the whole-process ratio."""
    runs = {k: v for k, v in matmul_runs(args.matmul_n, True).items() if "bfloat16" not in k}
    rss = PeakRSS()
    t = interleaved({k: fn for k, (fn, _) in runs.items()}, max(args.reps, 3), 1, rss)
    rss.close()
    return {k: runs[k][1] / t[k]["median_s"] / 1e9 for k in runs}


def _compile_seconds(stderr: str) -> float:
    """Compile seconds from mone-jax's closing phase line (``done: 4.1 s compiling 3 programs``)."""
    for line in stderr.splitlines()[::-1]:
        if "] done: " in line:
            return float(line.split("] done: ")[1].split(" s ")[0])
    return float("nan")


def print_whole_process(res: dict) -> None:
    loads = res["load_avg"]
    print(f"\nwhole process, medians of {res['config']['reps']} alternating runs; load average "
          f"{min(loads):.1f}-{max(loads):.1f}\n")
    print("| calibration tokens | mone-jax first run | mone-jax rerun | PyTorch path | ratio, first run | "
          "ratio, rerun | rerun faster by | compile s, first / rerun |")
    print("|---|---|---|---|---|---|---|---|")
    for n, m in res["median"].items():
        first, rerun, torch_s = m["mone-jax first"], m["mone-jax rerun"], m["pytorch"]
        print(f"| {n:,} | {first:.1f} s | {rerun:.1f} s | {torch_s:.1f} s | {torch_s / first:.2f}x | "
              f"{torch_s / rerun:.2f}x | {1 - rerun / first:.0%} | {m['compile first']:.1f} / {m['compile rerun']:.1f} |")
    print(f"\nstatistics of the two processes agree: {res['parity_vs_torch_float32']}")
    j, t = res["matmul_gflops"]["matmul jax float32"], res["matmul_gflops"]["matmul torch float32"]
    print(f"\ndense f32 matmul, {res['config']['matmul_n']}^3: jnp.dot {j:.0f} GFLOP/s, torch.mm {t:.0f} GFLOP/s "
          f"(jax / torch {j / t:.2f}x)")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.whole_process:
        res = whole_process(args)
        print_whole_process(res)
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
        print(f"results -> {args.json}")
        return res
    res = run(args)
    print_table(res)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"results -> {args.json}")
    return res


if __name__ == "__main__":
    if "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", ""):  # fresh big buffers: huge pages
        os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"),
                                                              "glibc.malloc.hugetlb=1"]))
        os.execv(sys.executable, [sys.executable, *sys.argv])
    main()
