"""What a pruned folder says about itself: the plan, a statistics summary and a model card (README.md with
YAML front matter), written into the export and its manifest by ``mone-jax prune``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mone_jax.base.stats import Stats
from mone_jax.pruning.planning import Plan

PLAN_FILE = "mone_plan.json"
STATS_FILE = "mone_stats_summary.json"
CARD_FILE = "README.md"

_LOAD = {
    "substitute": 'from transformers import AutoModelForCausalLM, AutoTokenizer\n'
                  'model = AutoModelForCausalLM.from_pretrained("{out}", trust_remote_code=True)  # modeling_mone.py\n'
                  'tokenizer = AutoTokenizer.from_pretrained("{out}", trust_remote_code=True)',
    "modepd": 'from transformers import AutoTokenizer\n'
              'from mone_jax.convert.modeling_mone import from_pretrained  # no auto_map, as the reference\'s own\n'
              'model = from_pretrained("{out}")\n'
              'tokenizer = AutoTokenizer.from_pretrained("{out}")',
    "drop": 'from transformers import AutoModelForCausalLM, AutoTokenizer\n'
            'model = AutoModelForCausalLM.from_pretrained("{out}")  # a stock checkpoint with fewer experts\n'
            'tokenizer = AutoTokenizer.from_pretrained("{out}")',
}


def stats_summary(stats: Stats) -> dict:
    """Per MoE layer and expert: routed tokens, mean applied routing weight, norm of the output's std."""
    layers = {}
    for i, s in stats.layers.items():
        layers[str(i)] = {"count": s.count.tolist(),
                          "routing_score": (s.weight_sum / max(stats.tokens, 1)).round(8).tolist(),
                          "output_std_norm": np.sqrt(s.var.sum(axis=1)).round(8).tolist()}
    return {"tokens": stats.tokens, "layers": layers}


def folder_files(*, source: str, out: str, plan: Plan, stats: Stats | None, fmt: str, mode: str, kept: dict,
                 calibration: dict, version: str) -> dict[str, bytes]:
    """The files (name -> bytes) that make an export self-describing. ``kept``: :func:`~mone_jax.pruning.planning.
    plan_summary`; ``calibration``: where the statistics came from (data, samples, tokens...); ``stats`` None:
    a weights-only plan exported without calibration (no statistics summary)."""
    meta = {"version": version, "source_model": source, "method": "MoNE (novices)" if mode == "substitute"
            else "expert dropping", "format": fmt, "metric": plan.metric, "scope": plan.scope,
            "pruned_fraction": round(kept["pruned_fraction"], 6), "kept_per_layer": kept["kept_per_layer"],
            "experts_per_layer": kept["experts_total"] // max(len(kept["kept_per_layer"]), 1),
            "calibration": {**calibration, **({} if stats is None else {"tokens": stats.tokens})}}
    front = "\n".join(["---", "library_name: transformers", "tags: [mone-jax, mixture-of-experts, expert-pruning]",
                       "mone_jax:", *(f"  {k}: {json.dumps(v)}" for k, v in meta.items()), "---"])
    novices = {i: list(lp.novices) for i, lp in plan.layers.items()}
    rows = "\n".join(f"| {i} | {len(lp.kept)} | {', '.join(map(str, novices[i])) or '-'} |"
                     for i, lp in plan.layers.items())
    calib = ", ".join(f"{k} {v}" for k, v in meta["calibration"].items())
    body = f"""
# Pruned with mone-jax {version}

`{source}` with {kept['pruned_fraction']:.1%} of its routed experts pruned ({meta['method']}, metric
`{plan.metric}`, scope `{plan.scope}`), written in the `{fmt}` format. Calibration: {calib}.

| MoE layer | experts kept | {'novices' if mode == 'substitute' else 'dropped'} (original ids) |
|---|---|---|
{rows}

Load it:

```python
{_LOAD.get(fmt, _LOAD[mode]).format(out=Path(out).name)}
```

The plan is in `{PLAN_FILE}`,{'' if stats is None else f' per-expert calibration statistics in `{STATS_FILE}`,'} sha256 sums
of every file in `mone_manifest.json` (`mone-jax verify {Path(out).name}`). Perplexity: `mone-jax eval {Path(out).name} --data HELD_OUT_TEXT`.
"""
    files = {CARD_FILE: (front + "\n" + body).encode(), PLAN_FILE: (json.dumps(plan.to_dict(), indent=1) + "\n").encode()}
    if stats is not None:
        files[STATS_FILE] = (json.dumps(stats_summary(stats), indent=1) + "\n").encode()
    return files
