"""mone-jax: MoNE expert pruning (Mixture-of-Novices-and-Experts) for MoE language models in JAX.

    model = mone_jax.load_hf("hf_folder", dtype="float32")
    ids = mone_jax.load_token_blocks("data.txt", tokenizer_dir="hf_folder", num_samples=64, seq_len=512)
    stats = mone_jax.calibrate(model, mone_jax.calibration_batches(ids, batch_size=8))
    plan = mone_jax.plan(stats, keep=N, metric="mone", scope="layer")
    pruned = mone_jax.prune(model, stats, plan)
    mone_jax.save_hf(pruned, "out_dir", format="substitution", source="hf_folder")
    mone_jax.perplexity(pruned, held_out_ids)  # {"perplexity", "nll", "tokens"}
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mone_jax.base.errors import UserError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from mone_jax.base.stats import Stats
    from mone_jax.model.causal_lm import MoEForCausalLM
    from mone_jax.pruning.planning import Plan

# Imported on first use, to keep `mone-jax --help` and light commands free of JAX's start-up (0.3 s, not 3.5 s);
# dependencies run one way (tests/test_architecture.py), so nothing here breaks a cycle.
_LAZY = {
    "load_hf": "mone_jax.convert.load", "calibrate": "mone_jax.calib.calibration", "prune": "mone_jax.pruning.transform",
    "Stats": "mone_jax.base.stats", "MoEForCausalLM": "mone_jax.model.causal_lm", "load_plan": "mone_jax.pruning.planning",
    "save_plan": "mone_jax.pruning.planning", "make_plan": "mone_jax.pruning.planning", "Plan": "mone_jax.pruning.planning",
    "calibration_batches": "mone_jax.calib.calibration", "load_token_blocks": "mone_jax.app.data",
    "perplexity": "mone_jax.evaluate.perplexity", "generate": "mone_jax.model.decoding",
}
__all__ = ["load_hf", "calibrate", "plan", "prune", "save_hf", "Stats", "MoEForCausalLM", "UserError",
           "Plan", "load_plan", "save_plan", "calibration_batches", "load_token_blocks", "perplexity",
           "generate", "__version__"]


def __dir__() -> list[str]:
    """The public API (the lazily imported names included)."""
    return sorted(__all__)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mone_jax' has no attribute {name!r}")


def plan(stats: Stats | None, keep: int | None = None, *, ratio: float | None = None, metric: str = "mone",
         scope: str = "layer", seed: int = 0, n_group: int = 1, semantics: str = "exact",
         model: str | None = None) -> Plan:
    """Which experts stay and which become novices (docs/formats.md); ``n_group``: the router's
    expert groups, for a ``drop`` plan that keeps the same number in every group; ``semantics``:
    ``exact`` or ``reference`` (as the MoNE reference code; needs statistics calibrated with it). A
    weights-only ``metric`` (``aimer``) scores the checkpoint folder ``model`` and needs no ``stats`` (None)."""
    from mone_jax.convert.criteria import plan_for

    return plan_for(metric, stats=stats, model=model, keep=keep, ratio=ratio, scope=scope, seed=seed,
                    n_group=n_group, semantics=semantics)


def save_hf(model: MoEForCausalLM, out_dir, format: str = "substitution", *, source, dtype: str | None = None,
            overwrite: bool = False) -> dict:
    """Export the arrays ``model`` holds (pruned or not) as a Hugging Face folder in ``format``; ``source`` is
    the checkpoint folder the model was loaded from (its config.json and tokenizer files are carried over)."""
    from mone_jax.convert.export import export_model

    return export_model(model, source, out_dir, fmt=format, dtype=dtype, overwrite=overwrite)
