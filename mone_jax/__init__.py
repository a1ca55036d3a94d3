"""mone-jax: MoNE expert pruning (Mixture-of-Novices-and-Experts) for MoE language models in JAX.

    model = mone_jax.load_hf("hf_folder", dtype="float32")
    stats = mone_jax.calibrate(model, batches)
    plan = mone_jax.plan(stats, keep=N, metric="mone", scope="layer")
    pruned = mone_jax.prune(model, stats, plan)
    mone_jax.save_hf(pruned, "out_dir", format="substitution", source="hf_folder")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mone_jax.errors import UserError

if TYPE_CHECKING:
    from mone_jax.model import MoEForCausalLM
    from mone_jax.stats import Stats

# Imported on first use, so that `convert` and `mone_jax` submodules can import each other freely.
_LAZY = {
    "load_hf": "mone_jax.convert.load", "calibrate": "mone_jax.calibration", "prune": "mone_jax.pruning",
    "Stats": "mone_jax.stats", "MoEForCausalLM": "mone_jax.model", "load_plan": "mone_jax.scoring",
    "save_plan": "mone_jax.scoring", "make_plan": "mone_jax.scoring",
}
__all__ = ["load_hf", "calibrate", "plan", "prune", "save_hf", "Stats", "MoEForCausalLM", "UserError",
           "load_plan", "save_plan"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mone_jax' has no attribute {name!r}")


def plan(stats: Stats, keep: int | None = None, *, ratio: float | None = None, metric: str = "mone",
         scope: str = "layer", seed: int = 0) -> dict:
    """Which experts stay and which become novices (docs/formats.md)."""
    from mone_jax.scoring import make_plan

    return make_plan(stats, keep=keep, ratio=ratio, metric=metric, scope=scope, seed=seed)


def save_hf(model: MoEForCausalLM, out_dir, format: str = "substitution", *, source, dtype: str | None = None,
            overwrite: bool = False) -> dict:
    """Export the arrays ``model`` holds (pruned or not) as a Hugging Face folder in ``format``; ``source`` is
    the checkpoint folder the model was loaded from (its config.json and tokenizer files are carried over)."""
    from mone_jax.convert.export import export_model

    return export_model(model, source, out_dir, fmt=format, dtype=dtype, overwrite=overwrite)
