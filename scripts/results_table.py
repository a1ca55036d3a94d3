"""Validation perplexity of the demo model pruned by every metric, written to docs/results.md (+ plots).

    python scripts/results_table.py      # reads ../shared/corpus/{train,valid}.txt

One calibration pass over training text; for each output mode (MoNE novices = ``substitute``,
experts removed = ``drop``), pruning ratio and metric, a layer-scope plan, the pruned model in
memory and its perplexity on validation text: on seeded random windows of all of valid.txt,
and on each of its two sources alone (the corpus concatenates them: valid.txt starts with the
Python documentation and ends with the Bible). ``random`` is averaged over several seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mone_jax.calibration import calibrate  # noqa: E402
from mone_jax.convert.load import load_hf  # noqa: E402
from mone_jax.data import load_token_blocks  # noqa: E402
from mone_jax.demo import demo_model_dir  # noqa: E402
from mone_jax.evaluate import perplexity  # noqa: E402
from mone_jax.planning import make_plan  # noqa: E402
from mone_jax.pruning import prune  # noqa: E402
from mone_jax.scoring import METRICS  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpus"
MODES = {"substitute": "MoNE novices (substitution)", "drop": "experts dropped (drop)"}
SOURCE_BYTES = 120_000  # head / tail of valid.txt taken as its Python-docs / Bible part


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the shipped demo model)")
    ap.add_argument("--train", default=str(CORPUS / "train.txt"), help="calibration text")
    ap.add_argument("--valid", default=str(CORPUS / "valid.txt"), help="evaluation text")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--eval-samples", type=int, default=256)
    ap.add_argument("--source-samples", type=int, default=32, help="blocks of each source of valid.txt")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    ap.add_argument("--out-dir", default=str(REPO / "docs"))
    ap.add_argument("--replot", action="store_true", help="redraw demo_ppl.png from OUT_DIR/results.json only")
    return ap.parse_args(argv)


def source_blocks(args: argparse.Namespace, folder: str, vocab: int) -> dict[str, np.ndarray]:
    """Consecutive blocks from the head (Python docs) and the tail (Bible) of valid.txt, cut at lines."""
    data = Path(args.valid).read_bytes()
    parts = {"python": data[:SOURCE_BYTES].rsplit(b"\n", 1)[0], "bible": data[-SOURCE_BYTES:].split(b"\n", 1)[1]}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in parts.items():
            path = Path(tmp) / f"{name}.txt"
            path.write_bytes(text)
            out[name] = load_token_blocks(str(path), tokenizer_dir=folder, num_samples=args.source_samples,
                                          seq_len=args.seq_len, contiguous=True, vocab_size=vocab)
    return out


def batches(ids: np.ndarray) -> list[np.ndarray]:
    return [ids[i:i + 8] for i in range(0, len(ids), 8)]


def run(args: argparse.Namespace) -> dict:
    folder = args.model or str(demo_model_dir())
    model = load_hf(folder, progress=False)
    V = model.config.vocab_size
    calib = load_token_blocks(args.train, tokenizer_dir=folder, num_samples=args.calib_samples,
                              seq_len=args.seq_len, seed=args.seed, vocab_size=V)
    evals = {"valid": load_token_blocks(args.valid, tokenizer_dir=folder, num_samples=args.eval_samples,
                                        seq_len=args.seq_len, seed=0, vocab_size=V),
             **source_blocks(args, folder, V)}
    stats = calibrate(model, batches(calib), progress=False)

    def ppl(m) -> dict[str, float]:
        return {name: perplexity(m, ids)["perplexity"] for name, ids in evals.items()}

    freq = {}
    for name in ("python", "bible"):
        s = calibrate(model, batches(evals[name]), progress=False)
        freq[name] = {i: s.layers[i].count / s.tokens for i in s.layers}
    bible_share = {i: freq["bible"][i] / np.maximum(freq["bible"][i] + freq["python"][i], 1e-12) for i in stats.layers}

    original = ppl(model)
    print(f"original: {original}", flush=True)
    rows: dict[str, dict[str, list[dict[str, float]]]] = {}
    plans = {}
    for mode in MODES:
        for ratio in args.ratios:
            for metric in METRICS:
                cell = []
                for seed in range(args.random_seeds) if metric == "random" else [0]:
                    plan = make_plan(stats, ratio=ratio, metric=metric, scope="layer", seed=seed)
                    plans.setdefault((metric, ratio), plan.to_dict())
                    cell.append(ppl(prune(model, stats, plan, mode=mode)))
                rows.setdefault(metric, {})[f"{mode}@{ratio}"] = cell
                print(f"{mode} {ratio:.0%} {metric}: {cell}", flush=True)
    return {"original": original, "tokens": {k: int(v[:, 1:].size) for k, v in evals.items()},
            "calib_tokens": stats.tokens, "keep": {r: plans[("mone", r)]["keep"] for r in args.ratios},
            "num_experts": model.config.num_experts, "top_k": model.config.top_k, "rows": rows,
            "plans": plans, "bible_share": bible_share}


def mean(cell: list[dict[str, float]], key: str) -> float:
    return float(np.mean([c[key] for c in cell]))


def fmt(cell: list[dict[str, float]], key: str, best: float) -> str:
    vals = [c[key] for c in cell]
    text = f"{np.mean(vals):.2f}" + (f" ({min(vals):.2f}-{max(vals):.2f})" if len(vals) > 1 else "")
    return f"**{text}**" if np.isclose(np.mean(vals), best) else text


def table(res: dict, cols: list[tuple[str, str]], heads: list[str]) -> str:
    """Markdown table: a row per metric, columns (mode@ratio, eval set); bold = best in the column."""
    lines = ["| metric | " + " | ".join(heads) + " |", "|" + "---|" * (len(cols) + 1),
             "| (original, unpruned) | " + " | ".join(f"{res['original'][k]:.2f}" for _, k in cols) + " |"]
    best = [min(mean(r[c], k) for r in res["rows"].values()) for c, k in cols]
    for metric, cells in res["rows"].items():
        lines.append(f"| {metric} | " + " | ".join(fmt(cells[c], k, b) for (c, k), b in zip(cols, best)) + " |")
    return "\n".join(lines)


def pruned_share(res: dict, metric: str, ratio: float) -> float:
    """Mean Bible share of the experts ``metric`` prunes at ``ratio`` (all layers)."""
    plan = res["plans"][(metric, ratio)]
    return float(np.mean([res["bible_share"][int(i)][e] for i, lay in plan["layers"].items() for e in lay["novices"]]))


def markdown(args: argparse.Namespace, res: dict, seconds: float) -> str:
    E, r0 = res["num_experts"], args.ratios[0]
    main_cols = [(f"{m}@{r}", "valid") for m in MODES for r in args.ratios]
    main_heads = [f"{m} {r:.0%} (keep {res['keep'][r]}/{E})" for m in MODES for r in args.ratios]
    src_cols = [(f"{m}@{r0}", k) for m in MODES for k in ("python", "bible")]
    src_heads = [f"{m} {r0:.0%}, {k}" for m in MODES for k in ("python", "bible")]
    key = f"substitute@{r0}"
    mone, freq, rnd = (mean(res["rows"][k][key], "valid") for k in ("mone", "frequency", "random"))
    verdict = "lower than both" if mone < min(freq, rnd) else "NOT lower than both"
    src = {k: {m: mean(res["rows"][m][key], k) for m in ("mone", "frequency", "random")} for k in ("python", "bible")}
    all_share = float(np.mean([s for s in res["bible_share"].values()]))
    specialised = ", ".join(f"layer {i}: {int(np.sum(np.abs(s - 0.5) > 0.25))}/{E}"
                            for i, s in sorted(res["bible_share"].items()))
    shares = ", ".join(f"{m} {pruned_share(res, m, r0):.0%}" for m in ("mone", "frequency", "routing-score",
                                                                           "variance", "reap"))
    return f"""# Pruning results on the demo model

Validation perplexity (lower is better) of the shipped demo model (`mone_jax/demo/model`, Qwen3-MoE
layout, {E} routed experts per layer, top-{res['top_k']}) after pruning each MoE layer's experts by
each metric (layer scope: the same number kept in every layer).

- Calibration: {res['calib_tokens']:,} tokens of `train.txt` ({args.calib_samples} random blocks of
  {args.seq_len} tokens, seed {args.seed}), one pass shared by all metrics.
- Evaluation: {res['tokens']['valid']:,} predicted tokens of `valid.txt` ({args.eval_samples} windows of
  {args.seq_len} tokens at seeded random offsets, seed 0, as in the model card), token-level
  perplexity computed in JAX (`mone_jax.evaluate.perplexity`).
- `substitute`: pruned experts become MoNE novices (their mean output), the router unchanged.
  `drop`: pruned experts and their router rows are removed; top-k runs over the rest.
- `random`: mean over {args.random_seeds} seeds, range in parentheses. Bold: best metric per column.

{table(res, main_cols, main_heads)}

## Verdict

At {r0:.0%} pruning with novices, MoNE's validation perplexity is **{verdict}** `frequency` and
`random` on this model (MoNE {mone:.2f}, frequency {freq:.2f}, random {rnd:.2f}).

Why: the demo model's experts specialise by source. The corpus is two sources, Python documentation
(most of it) and the World English Bible, and many experts take their tokens mainly from one of
them (third heat map below: the share of each expert's routed tokens that come from the Bible text,
measured on {res['tokens']['python']:,} tokens of each source, 50% = no preference; experts outside
25-75% per layer: {specialised}). The Bible is the
minority of the calibration text, so its specialists have the lowest routing scores, and every
metric built on routing (`mone` = routing score x output spread, `frequency`, `routing-score`,
`reap`) prunes them first. Mean Bible share of the experts pruned at {r0:.0%}: {shares}; over all
experts {all_share:.0%}. Each source alone (first / last {SOURCE_BYTES // 1000} kB of `valid.txt`,
{args.source_samples} consecutive blocks each):

{table(res, src_cols, src_heads)}

At {r0:.0%} with novices, on the Python documentation (the bulk of the calibration data) the
perplexity goes from {res['original']['python']:.2f} to {src['python']['mone']:.2f} with MoNE
(frequency {src['python']['frequency']:.2f}, random {src['python']['random']:.2f}); on the Bible from
{res['original']['bible']:.2f} to {src['bible']['mone']:.2f} (frequency {src['bible']['frequency']:.2f},
random {src['bible']['random']:.2f}); the mixed validation set weighs both. MoNE ranks experts by how
much the calibration data needs them: calibrate on data like the data the pruned model must serve.

![expert scores and source specialisation](demo_scores.png)

![perplexity vs pruning ratio](demo_ppl.png)

Regenerate ({seconds / 60:.0f} min on 2 shared CPU cores; needs `../shared/corpus/`):

```bash
python scripts/results_table.py
```
"""


def plots(args: argparse.Namespace, res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r0 = args.ratios[0]
    layers = sorted(res["bible_share"])
    panels = [("mone", "MoNE score / layer max", "viridis"), ("frequency", "frequency / layer max", "viridis"),
              ("mone", "share of tokens from the Bible", "coolwarm")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.6 * len(layers) + 2.4))
    for n, (ax, (metric, title, cmap)) in enumerate(zip(axes, panels)):
        plan = res["plans"][(metric, r0)]
        if n < 2:
            vals = np.array([plan["layers"][str(i)]["scores"] for i in layers])
            vals = vals / vals.max(axis=1, keepdims=True)
        else:
            vals = np.array([res["bible_share"][i] for i in layers])
        im = ax.imshow(vals, aspect="auto", cmap=cmap, vmin=0, vmax=1)
        for row, i in enumerate(layers):
            for e in plan["layers"][str(i)]["novices"]:
                ax.text(e, row, "x", ha="center", va="center", color="black", fontsize=10, fontweight="bold")
        ax.set(title=f"{title}\n(x: pruned by {metric} at {r0:.0%})", xlabel="expert", ylabel="layer",
               yticks=range(len(layers)), yticklabels=layers)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(out / "demo_scores.png", dpi=100)
    plt.close(fig)

    ppl_plot(res, args.ratios, out / "demo_ppl.png")


# one look per metric: colour, line style and marker all differ, so lines stay apart in grey print too
_STYLES = [("tab:blue", "-", "o"), ("tab:orange", "--", "s"), ("tab:green", "-.", "^"), ("tab:red", ":", "D"),
           ("tab:purple", "-", "v"), ("tab:brown", "--", "P"), ("tab:pink", "-.", "X"), ("tab:olive", ":", "*")]


def ppl_plot(res: dict, ratios: list[float], path: Path):
    """Validation perplexity against the pruned fraction, one panel per mode, log axis labelled as such;
    metrics run over several seeds (random) show their min-max range as a band. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    fig, axes = plt.subplots(1, len(MODES), figsize=(11, 4.4), sharey=True)
    xs = [0.0, *ratios]
    base = res["original"]["valid"]
    values = [base]
    for ax, mode in zip(axes, MODES):
        for (metric, cells), (color, style, marker) in zip(res["rows"].items(), _STYLES):
            runs = [cells[f"{mode}@{r}"] for r in ratios]
            ys = [base, *(mean(c, "valid") for c in runs)]
            values += ys
            seeds = len(runs[0])
            label = metric if seeds == 1 else f"{metric} (mean of {seeds} seeds, band: min-max)"
            ax.plot(xs, ys, color=color, linestyle=style, marker=marker, label=label)
            if seeds > 1:
                lo = [base, *(min(x["valid"] for x in c) for c in runs)]
                hi = [base, *(max(x["valid"] for x in c) for c in runs)]
                ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
        ax.set(title=MODES[mode], xlabel="fraction of experts pruned", xticks=xs, yscale="log")
        ax.grid(alpha=0.3, which="both")
    lo, hi = min(values), max(values)
    ticks = [t for t in (60, 70, 80, 90, 100, 120, 140, 160, 180, 200, 250, 300, 400, 500) if lo * 0.9 <= t <= hi * 1.1]
    for ax in axes:
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_locator(NullLocator())
    axes[0].set_ylabel("validation perplexity (log scale)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot:  # the perplexity figure again from the saved numbers, in seconds
        res = json.loads((Path(args.out_dir) / "results.json").read_text())
        ratios = sorted({float(k.split("@")[1]) for k in next(iter(res["rows"].values()))})
        ppl_plot(res, ratios, Path(args.out_dir) / "demo_ppl.png")
        return
    t0 = time.time()
    res = run(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots(args, res, out)
    (out / "results.md").write_text(markdown(args, res, time.time() - t0))
    summary = {k: res[k] for k in ("original", "tokens", "calib_tokens", "num_experts", "rows")}
    summary["bible_share"] = {str(i): [round(float(x), 4) for x in v] for i, v in res["bible_share"].items()}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out / 'results.md'} ({(time.time() - t0) / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
