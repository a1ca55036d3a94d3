"""bfloat16 calibration against float32: routing, statistics, kept experts and (demo) held-out perplexity.

    python bench/precision_bench.py                       # docs/precision.md (~20 min on 2 busy cores)
    python bench/precision_bench.py --families none       # the demo only
    python bench/precision_bench.py --help

Models: the shipped demo (calibration: the balanced mix ``python:0.5,bible:0.5`` of the corpus' train text,
``--calib-samples`` x ``--seq-len`` tokens; held-out: the second halves of the Python and Bible parts of
valid.txt, as scripts/results_table.py cuts them; docs/precision.md was measured on the 120 kB head / tail
of valid.txt, the cut of an earlier version) and every family's tiny random test config (tests/conftest.py
``PER_FAMILY``, built by its ``build_hf``; calibration: uniform random token ids). Per model and calibration
seed, each compute dtype (``float32`` at ``highest``, ``bfloat16`` at ``default``, and ``bf16-router-f32``:
bfloat16 with the router weights and logits in float32) is calibrated with :func:`mone_jax.calibrate` and
compared with float32:

- routing: the share of routed (token, slot) pairs whose expert is not among float32's top-k for the token,
  per MoE layer (each model routes its own hidden states, read in its forward program; in bfloat16 that program
  rounds differently from the calibration's layer programs, so the pairs it routes elsewhere than the
  calibration did are counted too);
- statistics: relative error ``|a - b| / |b|`` (vector norms over the hidden dimension) of each expert's mean
  and variance, over the experts routed the same number of tokens in both;
- plans: experts kept at 25% / 50% pruned (``mone``, scope layer) that differ from float32's plan (and which
  other statistics metrics' plans differ);
- demo: pooled held-out perplexity of the pruned float32 model made from each dtype's statistics and plan,
  and of the pruned model in the dtype itself.

Writes a Markdown report (``--md``) and the raw numbers (``--json``). Runs on CPU; no accelerator needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "")  # one CPU device, default optimisation (tests/conftest.py sets its own)
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import mone_jax  # noqa: E402
from mone_jax.app.mix import mix_blocks, parse_mix  # noqa: E402
from mone_jax.base.precision import default_for, matmul_precision  # noqa: E402
from mone_jax.calib.calibration import default_batch_size  # noqa: E402
from mone_jax.convert.families import parse_config  # noqa: E402
from mone_jax.convert.load import load_hf  # noqa: E402
from mone_jax.convert.reader import read_config  # noqa: E402
from mone_jax.demo import demo_model_dir  # noqa: E402
from mone_jax.model.causal_lm import capture_sown, route  # noqa: E402
from mone_jax.pruning.scoring import REGISTRY  # noqa: E402

DTYPES = ("float32", "bfloat16", "bf16-router-f32")
RATIOS = "0.25,0.5"  # fractions pruned (--ratios)
STATS_METRICS = [m for m, v in REGISTRY.items() if not v.needs_weights and m != "random"]


def load(folder, dtype: str):
    """The model in compute ``dtype``; ``bf16-router-f32``: bfloat16 with float32 router weights and logits."""
    if dtype != "bf16-router-f32":
        return load_hf(folder, dtype, progress=False)
    model, f32 = load_hf(folder, "bfloat16", progress=False), load_hf(folder, "float32", progress=False)
    for i, blk in model.moe_blocks().items():
        blk.router.set_value(f32.moe_blocks()[i].router[...])
        blk.cfg = dataclasses.replace(blk.cfg, router_fp32=True)
    return model


def routing(model, ids: np.ndarray, batch: int) -> dict[int, np.ndarray]:
    """{MoE layer: expert ids [N * T, k]} the model routes the tokens ``ids`` [N, T] to."""
    blocks = model.moe_blocks()
    for blk in blocks.values():
        blk.sow_router = True
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, ids):
        m = nnx.merge(graphdef, state)
        _, sown = capture_sown(m.hidden_states, ids, name="router_logits")
        biases = {p[1]: m.layers[p[1]].mlp.score_bias for p in sown}
        return {p[1]: route(v, m.config, None if biases[p[1]] is None else biases[p[1]][...])[0] for p, v in sown.items()}

    outs = [jax.device_get(step(state, ids[i:i + batch])) for i in range(0, len(ids), batch)]
    for blk in blocks.values():
        blk.sow_router = False
    return {i: np.concatenate([o[i] for o in outs]) for i in outs[0]}


def flips(a: np.ndarray, b: np.ndarray) -> float:
    """Share of routed pairs of ``a`` [T, k] whose expert is not among the same token's experts in ``b``."""
    hit = (a[:, :, None] == b[:, None, :]).any(-1)
    return float(1.0 - hit.mean())


def program_gap(routes: dict[int, np.ndarray], stats) -> list[int]:
    """Per MoE layer, routed pairs the forward program sends elsewhere than the calibration program did (a lower
    bound: half the L1 distance of the two per-expert counts; 0 in float32, where both compute the same products)."""
    return [int(np.abs(np.bincount(routes[i].reshape(-1), minlength=stats.num_experts) - stats.layers[i].count).sum())
            // 2 for i in sorted(routes)]


def rel_errors(a, b) -> dict:
    """Relative errors of means and variances over the experts routed equally often (and >= 2 times) in ``a`` and
    ``b`` (``*_equal``), and over every expert routed >= 2 times in both (``*_all``: routing flips included)."""
    out: dict = {"equal_counts": 0, "count_differs": 0, "experts": 0}
    errs: dict = {}
    for i, lb in b.layers.items():
        la = a.layers[i]
        sets = {"equal": (la.count == lb.count) & (lb.count > 1), "all": (la.count > 1) & (lb.count > 1)}
        out["equal_counts"] += int(sets["equal"].sum())
        out["count_differs"] += int((la.count != lb.count).sum())
        out["experts"] += int(lb.count.size)
        for key, x, y in (("mean", la.mean, lb.mean), ("var", la.var, lb.var)):
            rel = np.linalg.norm(x - y, axis=1) / np.maximum(np.linalg.norm(y, axis=1), 1e-30)
            for name, sel in sets.items():
                errs.setdefault(f"{key}_{name}", []).extend(rel[sel].tolist())
    for key, v in errs.items():
        out[f"{key}_median"], out[f"{key}_max"] = (float(np.median(v)), float(np.max(v))) if v else (None, None)
    return out


def kept_diff(a, b, ratio: float, metric: str = "mone") -> int:
    """Experts kept by ``a``'s plan and not by ``b``'s (summed over layers), at ``ratio`` pruned."""
    pa, pb = (mone_jax.plan(s, ratio=ratio, metric=metric) for s in (a, b))
    return sum(len(set(pa.layers[i].kept) - set(pb.layers[i].kept)) for i in pb.layers)


def pooled_ppl(model, valid: dict[str, np.ndarray]) -> dict:
    """Perplexity on each validation source and pooled (the token-weighted mean NLL)."""
    res = {k: mone_jax.perplexity(model, v) for k, v in valid.items()}
    nll = sum(r["nll"] * r["tokens"] for r in res.values()) / sum(r["tokens"] for r in res.values())
    return {"all": math.exp(nll), **{k: r["perplexity"] for k, r in res.items()}}


def measure(folder, ids: np.ndarray, dtypes, ratios: list[float], valid: dict | None) -> dict:
    """Every comparison of one model and calibration sample (module docstring)."""
    cfg = parse_config(read_config(folder))
    batch = min(len(ids), default_batch_size(cfg, ids.shape[1]))
    runs = {}
    for dt in dtypes:
        t0 = time.perf_counter()
        model = load(folder, dt)
        with matmul_precision(default_for("bfloat16" if dt.startswith("bf") else dt)):
            stats = mone_jax.calibrate(model, mone_jax.calibration_batches(ids, batch), progress=False)
            runs[dt] = {"model": model, "stats": stats, "routes": routing(model, ids, batch),
                        "seconds": time.perf_counter() - t0}
    ref = runs["float32"]
    out = {"tokens": int(ids.size), "layers": sorted(ref["routes"]), "dtypes": {}}
    for dt, r in runs.items():
        row = {"calib_seconds": round(r["seconds"], 2), "forward_vs_calibration": program_gap(r["routes"], r["stats"])}
        if dt != "float32":
            row["flips"] = [flips(r["routes"][i], ref["routes"][i]) for i in out["layers"]]
            row["stats"] = rel_errors(r["stats"], ref["stats"])
            row["kept_diff"] = {f"{q:g}": kept_diff(r["stats"], ref["stats"], q) for q in ratios}
            row["other_metrics_diff"] = {f"{q:g}": {m: d for m in STATS_METRICS if m != "mone"
                                                    if (d := kept_diff(r["stats"], ref["stats"], q, m))}
                                         for q in ratios}
        if valid is not None:
            row["ppl"] = {}
            for q in ratios:
                plan = mone_jax.plan(r["stats"], ratio=q)
                row["ppl"][f"{q:g}"] = {"f32 eval": pooled_ppl(mone_jax.prune(ref["model"], r["stats"], plan), valid)}
                if dt != "float32":
                    with matmul_precision("default"):
                        row["ppl"][f"{q:g}"]["own dtype"] = pooled_ppl(mone_jax.prune(r["model"], r["stats"], plan),
                                                                       valid)
            if dt == "float32":
                row["ppl"]["unpruned"] = pooled_ppl(r["model"], valid)
        out["dtypes"][dt] = row
    return out


def demo_data(args, tmp: Path, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The demo's calibration blocks (balanced mix) and held-out blocks {python, bible}."""
    from scripts.results_table import split_corpus

    files = split_corpus(tmp)
    mix = parse_mix(f"{files['train_python']}:0.5,{files['train_bible']}:0.5")
    ids, _ = mix_blocks(mix, tokenizer_dir=args.model, num_samples=args.calib_samples, seq_len=args.seq_len,
                        seed=seed, text_field="text", vocab_size=None)
    valid = {k: mone_jax.load_token_blocks(files[f"test_{k}"], tokenizer_dir=args.model, num_samples=args.valid_samples,
                                           seq_len=args.seq_len, contiguous=True) for k in ("python", "bible")}
    return ids, valid


def family_models(names: list[tuple[str, str]], tmp: Path) -> dict[str, Path]:
    """Saved tiny random checkpoints of tests/conftest.py's configs, as the tests build them."""
    from conftest import build_hf, save_hf

    return {f"{f}:{v}": save_hf(build_hf(f, v), tmp / f"{f}_{v}") for f, v in names}


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}e}"


def gap(row: dict) -> str:
    return " / ".join(map(str, row["forward_vs_calibration"]))


def errors(s: dict, key: str) -> str:
    """``median / max`` of the relative errors of ``key`` over the experts with equal counts, then over all."""
    return "; ".join(f"{fmt(s[f'{key}_{k}_median'])} / {fmt(s[f'{key}_{k}_max'])}" for k in ("equal", "all"))


HEADER = """# bfloat16 calibration against float32

Generated by `{command}` (jax {jax}, {backend}, {minutes:.0f} min); raw numbers in precision.json, method in
bench/precision_bench.py's docstring, what we recommend in README.md (*bfloat16 calibration, measured*).
Routed pairs changed: share of a layer's routed (token, slot) pairs whose expert is not among float32's top-k
for that token (read from the forward program). Forward vs calibration: pairs per layer that the forward
program routes elsewhere than the calibration program did (at least; both run the same model and tokens:
bfloat16 results depend on how XLA compiles and fuses each program). Relative errors: per expert, vector norm over the hidden dimension, over the experts routed the
same number (>= 2) of tokens in both ("compared"; "count differs": experts routed a different number of
tokens), then over all experts routed >= 2 tokens in both (flipped tokens included). Kept experts differing: experts of the `mone` plan (scope layer) absent
from float32's plan, summed over layers; other metrics: the same for frequency, routing-score, variance, reap,
man, msan (only those that differ). Perplexity (demo): pooled over the Python and Bible held-out parts, of the
pruned float32 model made from that dtype's statistics and plan, then of the pruned model run in the dtype.

"""


def ratio_keys(res: dict) -> list[str]:
    """The pruned fractions of a run, as its JSON keys them ("0.25", "0.5")."""
    return [f"{float(q):g}" for q in res["args"].get("ratios", RATIOS).split(",")]


def markdown(res: dict) -> str:
    """The report: one table of every model x seed x dtype, then the verdicts that hold in every seed."""
    qs = ratio_keys(res)
    pct = " / ".join(f"{float(q):.0%}" for q in qs)
    head = (f"| model | seed | dtype | routed pairs changed, per MoE layer | forward vs calibration, pairs per layer | experts: count differs; compared | "
            "mean rel. err. median / max: equal counts; all | var rel. err. median / max: equal counts; all | "
            f"kept experts differing {pct} (mone) | "
            f"other metrics differing | pruned ppl {pct} (f32 eval; own dtype) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, seeds in res["models"].items():
        for seed, m in seeds.items():
            for dt, r in m["dtypes"].items():
                if dt == "float32":
                    ppl = r.get("ppl")
                    extra = ("" if ppl is None else " / ".join(f"{ppl[q]['f32 eval']['all']:.2f}" for q in qs)
                             + f" (unpruned {ppl['unpruned']['all']:.2f})")
                    lines.append(f"| {name} | {seed} | float32 | ({m['tokens']:,} tokens) | {gap(r)} | | | | | | {extra} |")
                    continue
                s = r["stats"]
                other = "; ".join(f"{q}: " + ", ".join(f"{k} {v}" for k, v in d.items())
                                  for q, d in r["other_metrics_diff"].items() if d) or "none"
                ppl = r.get("ppl")
                extra = "" if ppl is None else " / ".join(
                    f"{ppl[q]['f32 eval']['all']:.2f}; {ppl[q]['own dtype']['all']:.2f}" for q in qs)
                lines.append(f"| {name} | {seed} | {dt} | {' / '.join(f'{f:.2%}' for f in r['flips'])} | {gap(r)} | "
                             f"{s['count_differs']}; {s['equal_counts']} of {s['experts']} | {errors(s, 'mean')} | "
                             f"{errors(s, 'var')} | {' / '.join(str(r['kept_diff'][q]) for q in qs)} | "
                             f"{other} | {extra} |")
    return "\n".join(lines) + "\n\n" + "\n".join(verdicts(res)) + "\n"


def verdicts(res: dict) -> list[str]:
    """Per dtype and ratio: the models whose mone plan equals float32's in every calibration seed, and the others."""
    out = []
    dts = sorted({dt for s in res["models"].values() for m in s.values() for dt in m["dtypes"]} - {"float32"},
                 key=DTYPES.index)
    for dt in dts:
        for q in ratio_keys(res):
            same, differ = [], []
            for name, seeds in res["models"].items():
                d = [m["dtypes"][dt]["kept_diff"][q] for m in seeds.values()]
                (same if not any(d) else differ).append(name if not any(d) else f"{name} ({'/'.join(map(str, d))})")
            out.append(f"- {dt}, {float(q):.0%} pruned: same kept experts as float32 in every seed for "
                       f"{len(same)} of {len(same) + len(differ)} models; differ in some seed: "
                       f"{', '.join(differ) or 'none'}.")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(demo_model_dir()), help="the demo model folder")
    ap.add_argument("--no-demo", action="store_true", help="skip the demo (it needs ../shared/corpus)")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--valid-samples", type=int, default=32, help="held-out blocks per source (demo)")
    ap.add_argument("--families", default="all", help="'all' (tests/conftest.py PER_FAMILY), 'none', or FAMILY:VARIANT,...")
    ap.add_argument("--family-samples", type=int, default=32)
    ap.add_argument("--family-seq-len", type=int, default=64)
    ap.add_argument("--seeds", default="0,1", help="calibration samples")
    ap.add_argument("--ratios", default=RATIOS, help="fractions of each layer's experts pruned")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="float32 always runs (the reference)")
    ap.add_argument("--md", default=str(REPO / "docs" / "precision.md"))
    ap.add_argument("--json", default=str(REPO / "docs" / "precision.json"))
    ap.add_argument("--render", metavar="JSON", help="only write --md from the numbers of an earlier run's JSON")
    args = ap.parse_args(argv)
    if args.render:
        return report(json.loads(Path(args.render).read_text()), args.md)
    seeds = [int(s) for s in args.seeds.split(",")]
    ratios = [float(q) for q in args.ratios.split(",")]
    dtypes = ["float32", *[d for d in args.dtypes.split(",") if d != "float32"]]
    if bad := [d for d in dtypes if d not in DTYPES]:
        ap.error(f"unknown dtype {bad[0]}: use {', '.join(DTYPES)}")
    command = " ".join(["python bench/precision_bench.py", *(argv if argv is not None else sys.argv[1:])])
    res: dict = {"command": command, "jax": jax.__version__, "backend": jax.default_backend(), "args": vars(args),
                 "models": {}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.no_demo:
            res["models"]["demo"] = {}
            for seed in seeds:
                ids, valid = demo_data(args, tmp, seed)
                res["models"]["demo"][seed] = measure(args.model, ids, dtypes, ratios, valid)
                print(f"demo seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.families != "none":
            from conftest import PER_FAMILY

            names = PER_FAMILY if args.families == "all" else [tuple(x.split(":")) for x in args.families.split(",")]
            for name, folder in family_models(names, tmp).items():
                cfg = parse_config(read_config(folder))
                res["models"][name] = {}
                for seed in seeds:
                    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (args.family_samples,
                                                                                   args.family_seq_len), np.int32)
                    res["models"][name][seed] = measure(folder, ids, dtypes, ratios, None)
                print(f"{name} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.json).write_text(json.dumps(res, indent=1))
    return report(res, args.md)


def report(res: dict, md: str) -> int:
    """Write the Markdown report of the numbers ``res`` to ``md`` and print it."""
    text = HEADER.format(command=res["command"], jax=res["jax"], backend=res["backend"],
                         minutes=res["seconds"] / 60) + markdown(res)
    Path(md).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
