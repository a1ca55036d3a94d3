"""What a pruned folder says about itself: the plan, a statistics summary and a model card (README.md with
YAML front matter), written into the export and its manifest by ``mone-jax prune``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from mone_jax.base.stats import Stats
from mone_jax.pruning.planning import DISTILLED, Plan

PLAN_FILE = "mone_plan.json"
STATS_FILE = "mone_stats_summary.json"
CARD_FILE = "README.md"


class Format(Protocol):
    """What the card tells of an export format (a record of the registry, :mod:`mone_jax.convert.formats`)."""

    name: str
    mode: str
    load_code: str  # Python that loads a folder "{out}" of this format


def stats_summary(stats: Stats) -> dict:
    """Per MoE layer and expert: routed tokens, mean applied routing weight, norm of the output's std."""
    layers = {}
    for i, s in stats.layers.items():
        layers[str(i)] = {"count": s.count.tolist(),
                          "routing_score": (s.weight_sum / max(stats.tokens, 1)).round(8).tolist(),
                          "output_std_norm": np.sqrt(s.var.sum(axis=1)).round(8).tolist()}
    return {"tokens": stats.tokens, "layers": layers}


def folder_files(*, source: str, out: str, plan: Plan, stats: Stats | None, fmt: Format, kept: dict,
                 calibration: dict, version: str, source_revision: str | None = None) -> dict[str, bytes]:
    """The files (name -> bytes) that make an export self-describing. ``kept``: :func:`~mone_jax.pruning.planning.
    plan_summary`; ``calibration``: where the statistics came from (data, samples, tokens...); ``stats`` None:
    a weights-only plan exported without calibration (no statistics summary); ``source_revision``: the commit of
    a hub model (``source`` is then its hub id)."""
    if source_revision is None:
        source = str(Path(source).resolve())  # not relative to the folder prune ran from
    meta = {"version": version, "source_model": source,
            **({"source_revision": source_revision} if source_revision else {}), "method": "MoNE (novices)" if fmt.mode == "substitute"
            else "expert dropping", "format": fmt.name, "metric": plan.metric, "scope": plan.scope,
            "pruned_fraction": round(kept["pruned_fraction"], 6), "kept_per_layer": kept["kept_per_layer"],
            "experts_per_layer": kept["experts_total"] // max(len(kept["kept_per_layer"]), 1),
            "calibration": {**calibration, **({} if stats is None else {"tokens": stats.tokens}),
                            **({"precision": stats.meta["precision"]} if stats is not None and "precision" in stats.meta
                               else {})}}  # the matmul precision the statistics were computed at
    if plan.selection:  # --metric auto: the choice and what it was chosen from
        meta["metric_selection"] = {"chosen": plan.selection["chosen"], "criterion": plan.selection["criterion"],
                                    "validation_nll": {m: round(c["nll"], 6)
                                                       for m, c in plan.selection["candidates"].items()}}
        if "tried" in plan.selection:  # over scopes x fits: every candidate, its loss and seconds
            meta["metric_selection"].update(chosen_candidate=plan.selection["chosen_candidate"], tried={
                t["candidate"]: {"nll": round(t["nll"], 6), "seconds": round(t["seconds"], 1)}
                for t in plan.selection["tried"]})
    if plan.fit:  # --fit: how the novices were fitted, and the validation loss before / after where measured
        meta["fit"] = plan.fit
    if plan.search:  # --scope greedy: how the experts were searched
        meta["greedy_search"] = {k: plan.search[k] for k in ("candidates", "evaluations", "validation_nll_start",
                                                              "validation_nll")}
    front = "\n".join(["---", "library_name: transformers", "tags: [mone-jax, mixture-of-experts, expert-pruning]",
                       "mone_jax:", *(f"  {k}: {json.dumps(v)}" for k, v in meta.items()), "---"])
    novices = {i: list(lp.novices) for i, lp in plan.layers.items()}
    rows = "\n".join(f"| {i} | {len(lp.kept)} | {', '.join(map(str, novices[i])) or '-'} |"
                     for i, lp in plan.layers.items())
    calib = ", ".join(f"{k} {v}" for k, v in meta["calibration"].items())
    chosen = ""
    if sel := meta.get("metric_selection"):
        losses = ", ".join(f"`{m}` {v:.4f}" for m, v in sel["validation_nll"].items())
        chosen = (f"\n\nThe metric was chosen by `--metric auto`: `{sel['chosen']}` gave the lowest validation loss "
                  f"(mean token NLL: {losses}).")
        if tried := sel.get("tried"):
            chosen += (f" Over scopes and fits, {len(tried)} candidates were tried and `{sel['chosen_candidate']}` "
                       "won (validation mean token NLL, seconds: " + ", ".join(
                           f"`{k}` {v['nll']:.4f}, {v['seconds']:.0f} s" for k, v in tried.items()) + ").")
    if s := plan.search:
        chosen += (f"\n\nThe novices were searched greedily (`--scope greedy`, {s['candidates']} candidates per layer "
                   f"and step by `{plan.metric}`): each step replaced the expert whose novice raised the validation "
                   f"loss least; {s['evaluations']} evaluations, mean token NLL {s['validation_nll_start']:.4f} -> "
                   f"{s['validation_nll']:.4f}.")
    if f := plan.fit:
        what = (f"The {DISTILLED[f['method']]} were distilled from the original model" if f["method"] in DISTILLED
                else "The novices were fitted")
        chosen += (f"\n\n{what} (`--fit {f['method']}`)" + (
            f": validation mean token NLL {f['validation_nll_before']:.4f} with plain means, "
            f"{f['validation_nll_after']:.4f} fitted." if "validation_nll_after" in f else "."))
    body = f"""
# Pruned with mone-jax {version}

`{source}` with {kept['pruned_fraction']:.1%} of its routed experts pruned ({meta['method']}, metric
`{plan.metric}`, scope `{plan.scope}`), written in the `{fmt.name}` format. Calibration: {calib}.{chosen}

| MoE layer | experts kept | {'novices' if fmt.mode == 'substitute' else 'dropped'} (original ids) |
|---|---|---|
{rows}

Load it with transformers, which needs PyTorch (`pip install torch`, or `pip install 'mone-jax[torch]'`):

```python
{fmt.load_code.format(out=Path(out).name)}
```

The plan is in `{PLAN_FILE}`,{'' if stats is None else f' per-expert calibration statistics in `{STATS_FILE}`,'} sha256 sums
of every file in `mone_manifest.json` (`mone-jax verify {Path(out).name}`). Perplexity: `mone-jax eval {Path(out).name} --data HELD_OUT_TEXT`.
"""
    files = {CARD_FILE: (front + "\n" + body).encode(), PLAN_FILE: (json.dumps(plan.to_dict(), indent=1) + "\n").encode()}
    if stats is not None:
        files[STATS_FILE] = (json.dumps(stats_summary(stats), indent=1) + "\n").encode()
    return files
