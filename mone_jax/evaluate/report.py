"""What ``mone-jax compare`` writes: a Markdown table per validation source, the JSON of every plan, and a
plot of perplexity against pruning ratio per metric (random seeds as a band)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mone_jax.base.files import atomic_write, atomic_write_text
from mone_jax.evaluate.compare import label

FILES = {"table": "compare.md", "json": "compare.json", "plot": "compare.png"}
LABEL = {"substitute": "substitution"}  # the word users see (the export format's)


def cells(result: dict) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{row (metric, and scope / fit where named): {"mode@ratio": {source: [perplexity per seed]}}} in the order
    the plans were run."""
    out: dict = {}
    for p in result["plans"]:
        col = out.setdefault(label(p), {}).setdefault(f"{p['mode']}@{p['ratio']:g}", {})
        for src, v in p["perplexity"].items():
            col.setdefault(src, []).append(v)
    return out


def columns(result: dict) -> list[tuple[str, str, float]]:
    """(column key, mode, ratio) in run order."""
    seen = {}
    for p in result["plans"]:
        seen.setdefault(f"{p['mode']}@{p['ratio']:g}", (p["mode"], p["ratio"]))
    return [(k, m, r) for k, (m, r) in seen.items()]


def _fmt(vals: list[float], best: float) -> str:
    text = f"{np.mean(vals):.2f}" + (f" ({min(vals):.2f}-{max(vals):.2f})" if len(vals) > 1 else "")
    return f"**{text}**" if np.isclose(np.mean(vals), best, rtol=1e-12) else text


def table(result: dict, source: str) -> str:
    """Markdown table of one source: a row per metric, a column per mode and ratio; bold = best mean."""
    cols, grid, E = columns(result), cells(result), result["num_experts"]
    keep = {f"{p['mode']}@{p['ratio']:g}": p["keep"] for p in result["plans"]}
    head = [f"{LABEL.get(m, m)} {r:.0%} (keep {keep[k]}/{E})" for k, m, r in cols]
    lines = ["| metric | " + " | ".join(head) + " |", "|" + "---|" * (len(cols) + 1),
             "| (original, unpruned) | " + " | ".join(f"{result['original'][source]['perplexity']:.2f}" for _ in cols)
             + " |"]
    best = {k: min(float(np.mean(g[k][source])) for g in grid.values()) for k, _, _ in cols}
    for name, g in grid.items():
        seeds = len(g[cols[0][0]][source])
        label = f"{name} ({seeds} seeds)" if seeds > 1 else name
        lines.append(f"| {label} | " + " | ".join(_fmt(g[k][source], best[k]) for k, _, _ in cols) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The whole page: one table per source (the first is the headline), how it was run, and the timing."""
    t = result.get("timing", {})
    src = result["sources"]
    parts = ["# Pruning plans compared", "",
             f"Model `{result.get('model', '?')}`; calibration on {result.get('calib_tokens', 0):,} tokens "
             f"(`{result.get('calib', '?')}`), one pass shared by every plan; {result['scope']} scope. "
             "Validation perplexity, lower is better; seeded metrics: mean (min-max) over seeds; bold: best "
             "mean per column. `substitution`: pruned experts become MoNE novices; `drop`: pruned experts and "
             "their router rows are removed.", ""]
    for name, info in src.items():
        what = "the sources pooled (token-weighted mean NLL)" if name == "all" else f"`{result['valid'][name]}`"
        parts += [f"## {name}: {what} ({info['tokens']:,} predicted tokens, {info['blocks']} blocks of "
                  f"{info['seq_len']})", "", table(result, name), ""]
    if any("scope" in p or "fit" in p for p in result["plans"]):
        parts += ["## Candidates", "", costs(result), ""]
    if t:
        parts += ["## Time", "", f"{len(result['plans'])} plans in {t['total']:.1f} s wall: load {t['load']:.1f} s, "
                  f"data {t['data']:.1f} s, calibration (and weight scores) {t['calibration']:.1f} s, compilation {t['compile']:.1f} s "
                  f"({t['compiles']} compiled loss functions for {t['shapes']} pruned shapes and the original), "
                  f"evaluation {t['forward_per_plan']:.2f} s per plan (median, all sources). Wall / (calibration + "
                  f"one evaluation per plan + compilation) = {t['ratio']:.2f}.", ""]
    return "\n".join(parts)


def costs(result: dict) -> str:
    """A row per candidate: validation NLL pooled and per source, seconds (search and fit included), and what the
    greedy search and the fit spent."""
    srcs = list(result["sources"])
    lines = ["| candidate | mode | ratio | " + " | ".join(f"NLL {s}" for s in srcs) + " | seconds | search | fit |",
             "|---|---|---|" + "---|" * len(srcs) + "---|---|---|"]
    for p in result["plans"]:
        search = p.get("search")
        fit = p.get("fitted") or {}
        lines.append(
            f"| {label(p)} | {LABEL.get(p['mode'], p['mode'])} | {p['ratio']:g} | "
            + " | ".join(f"{p['nll'][s]:.4f}" for s in srcs) + f" | {p['seconds']:.1f} | "
            + (f"{search['evaluations']} evaluations, {search['seconds']:.1f} s, kept "
               f"{'/'.join(map(str, search['kept_per_layer'].values()))}" if search else "") + " | "
            + (f"{fit['steps']} steps (best {fit['best_step']}), KL {fit['validation_kl_before']:.4f} -> "
               f"{fit['validation_kl_after']:.4f}, {fit['seconds']:.1f} s" if "steps" in fit else fit.get("method", ""))
            + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path):
    """Perplexity (log axis) against the fraction of experts pruned: a row per source, a column per mode,
    a line per metric, seeded metrics as mean line and min-max band; one legend. Returns the (closed) figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    cols, grid, sources = columns(result), cells(result), list(result["sources"])
    modes = list(dict.fromkeys(m for _, m, _ in cols))
    fig, axes = plt.subplots(len(sources), len(modes), figsize=(5.5 * len(modes), 3.8 * len(sources)),
                             squeeze=False, sharex=True, sharey="row")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles, markers = ("-", "--", "-.", ":"), "osD^vPX*<>"
    for row, src in enumerate(sources):
        for col, mode in enumerate(modes):
            ax = axes[row][col]
            ratios = [r for _, m, r in cols if m == mode]
            xs = [0.0, *ratios]
            for n, (name, g) in enumerate(grid.items()):
                vals = [g[f"{mode}@{r:g}"][src] for r in ratios]
                base = result["original"][src]["perplexity"]
                mean = [base, *(float(np.mean(v)) for v in vals)]
                color = colors[n % len(colors)]  # colour, line style and marker all differ: apart in grey too
                ax.plot(xs, mean, color=color, linestyle=styles[n % len(styles)], marker=markers[n % len(markers)],
                        label=name)
                if any(len(v) > 1 for v in vals):
                    ax.fill_between(xs, [base, *(min(v) for v in vals)], [base, *(max(v) for v in vals)],
                                    color=color, alpha=0.18, label=f"{name} range over seeds")
            ax.set_yscale("log")
            ax.set(title=f"{src}, {LABEL.get(mode, mode)}", xlabel="fraction of experts pruned")
            ax.grid(alpha=0.3)
        lo, hi = axes[row][0].get_ylim()
        ticks = sorted({float(f"{t:.2g}") for t in np.geomspace(lo, hi, 7)[1:-1]})
        axes[row][0].set_yticks(ticks, [f"{t:g}" for t in ticks])
        axes[row][0].yaxis.set_minor_locator(NullLocator())
        axes[row][0].set_ylabel(f"{src} perplexity (log scale)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    rows = -(-len(labels) // 4)
    fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.35 * rows / (3.8 * len(sources)), 1, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return fig


def write(result: dict, out: str | Path) -> dict[str, str]:
    """Write the table, the JSON and the plot into folder ``out``; their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / v for k, v in FILES.items()}
    atomic_write_text(paths["json"], json.dumps(result, indent=1) + "\n")
    atomic_write_text(paths["table"], markdown(result))
    plot(result, paths["plot"])
    return {k: str(v) for k, v in paths.items()}
