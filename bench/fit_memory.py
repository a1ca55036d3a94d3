"""Memory of one distillation step (``--fit kd`` / ``kd-down``): XLA's own analysis of the compiled step.

    python bench/fit_memory.py                         # the demo's shape and five variants, 8 x 256 tokens
    python bench/fit_memory.py --variants base,vocab4x --batch 4 --seq-len 512

Nothing is loaded or run: the teacher and the pruned student (``--kept`` of each MoE layer's experts) are
abstract shapes of the demo model's config (or ``--model``'s), each variant changing one dimension of it, and
:func:`mone_jax.evaluate.distill` 's step is lowered and compiled for them. The table gives XLA's temporaries
(``memory_analysis().temp_size_in_bytes``: the activations kept for the backward pass and every intermediate,
not the weights, optimizer state or inputs), in total and per token of the batch. Differences between rows give
what a dimension costs. The numbers are the backend's: this machine's CPU XLA at the flags in ``XLA_FLAGS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {  # name -> what changes in the config (a function of it)
    "base": lambda c: {},
    "vocab4x": lambda c: {"vocab_size": 4 * c.vocab_size},
    "layers2x": lambda c: {"num_layers": 2 * c.num_layers, "moe_layers": c.moe_layers * 2,
                           "sliding_windows": c.sliding_windows * 2},
    "hidden2x": lambda c: {"hidden_size": 2 * c.hidden_size, "num_heads": 2 * c.num_heads},
    "experts4x": lambda c: {"num_experts": 4 * c.num_experts},
    "expert_width4x": lambda c: {"moe_intermediate_size": 4 * c.moe_intermediate_size},
}


def step_temporaries(cfg, batch: int, seq_len: int, method: str, kept: float) -> int:
    """Bytes of temporaries XLA plans for one distillation step of ``method`` on ``batch`` x ``seq_len`` tokens."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from mone_jax.evaluate import distill
    from mone_jax.model.causal_lm import MoEForCausalLM

    k = max(cfg.top_k, round(kept * cfg.num_experts))
    teacher = nnx.eval_shape(lambda: MoEForCausalLM(cfg, jnp.float32, rngs=nnx.Rngs(0)))
    student = nnx.eval_shape(lambda: MoEForCausalLM(cfg, jnp.float32, rngs=nnx.Rngs(0),
                                                    kept={i: k for i in cfg.moe_layer_ids}))
    t_graph, t_state = nnx.split(teacher)
    graph, train, rest = nnx.split(student, lambda path, _: distill.fitted_path(student, path, method), ...)
    tx = optax.adam(1e-3)
    ids, real = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.float32)
    step = distill._step.lower(graph, train, rest, t_graph, t_state, tx, jax.eval_shape(tx.init, train), ids, real)
    return step.compile().memory_analysis().temp_size_in_bytes


def main(argv: list[str] | None = None) -> None:
    from mone_jax.app.jobs import checked_config
    from mone_jax.demo import demo_model_dir
    from mone_jax.pruning.planning import DISTILLED

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(demo_model_dir()), help="a checkpoint folder (its config.json only)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--kept", type=float, default=0.75, help="share of each MoE layer's experts kept")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    base = checked_config(args.model)
    tokens = args.batch * args.seq_len
    rows = []
    print(f"| variant | fit | temporaries MB | KB per token ({args.batch} x {args.seq_len} tokens) |\n|---|---|---|---|")
    for name in args.variants.split(","):
        if name not in VARIANTS:
            sys.exit(f"unknown variant '{name}': use {', '.join(VARIANTS)}")
        cfg = dataclasses.replace(base, **VARIANTS[name](base))
        for method in DISTILLED:
            temp = step_temporaries(cfg, args.batch, args.seq_len, method, args.kept)
            rows.append({"variant": name, "fit": method, "temp_bytes": temp, "tokens": tokens})
            print(f"| {name} | {method} | {temp / 1e6:.1f} | {temp / tokens / 1e3:.1f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
