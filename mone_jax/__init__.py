"""mone-jax: MoNE expert pruning (Mixture-of-Novices-and-Experts) for MoE language models in JAX.

    model = mone_jax.load_hf("hf_folder", dtype="float32")
    stats = mone_jax.calibrate(model, batches)
    plan = mone_jax.plan(stats, keep=N, metric="mone", scope="layer")
    pruned = mone_jax.prune(model, stats, plan)
    mone_jax.save_hf(pruned, "out_dir", format="substitution")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mone_jax.errors import UserError

if TYPE_CHECKING:
    from mone_jax.model import MoEForCausalLM
    from mone_jax.planning import Plan
    from mone_jax.stats import Stats

# Imported on first use, so that `convert` and `mone_jax` submodules can import each other freely.
_LAZY = {
    "load_hf": "mone_jax.convert.load", "calibrate": "mone_jax.calibration", "prune": "mone_jax.pruning",
    "Stats": "mone_jax.stats", "MoEForCausalLM": "mone_jax.model", "load_plan": "mone_jax.planning",
    "save_plan": "mone_jax.planning", "make_plan": "mone_jax.planning", "Plan": "mone_jax.planning",
}
__all__ = ["load_hf", "calibrate", "plan", "prune", "save_hf", "Stats", "MoEForCausalLM", "UserError",
           "Plan", "load_plan", "save_plan"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mone_jax' has no attribute {name!r}")


def plan(stats: Stats, keep: int | None = None, *, ratio: float | None = None, metric: str = "mone",
         scope: str = "layer", seed: int = 0, n_group: int = 1) -> Plan:
    """Which experts stay and which become novices (DESIGN.md section 3); ``n_group``: the router's
    expert groups, for a ``drop`` plan that keeps the same number in every group."""
    from mone_jax.planning import make_plan

    return make_plan(stats, keep=keep, ratio=ratio, metric=metric, scope=scope, seed=seed, n_group=n_group)


def save_hf(model: MoEForCausalLM, out_dir, format: str = "substitution", *, dtype: str | None = None,
            overwrite: bool = False) -> dict:
    """Export a (pruned) model as a Hugging Face folder; returns the export summary."""
    from mone_jax.config import parse_config
    from mone_jax.convert.export import export_pruned
    from mone_jax.convert.reader import read_config
    from mone_jax.pruning import pruned_layout

    if not model.source_dir:
        raise UserError("this model was not loaded from a Hugging Face folder, so it cannot be exported")
    num_experts = parse_config(read_config(model.source_dir)).num_experts
    layout, novices = pruned_layout(model, num_experts)
    return export_pruned(model.source_dir, out_dir, layout, novices, fmt=format, dtype=dtype, overwrite=overwrite)
