"""``mone-jax eval``: perplexity on held-out data (``--data``) or lm-evaluation-harness task accuracy
(``--tasks``) of a checkpoint, original or pruned."""

from __future__ import annotations

import json

from mone_jax.app.commands.common import load_model
from mone_jax.base.errors import UserError
from mone_jax.base.files import atomic_write_text
from mone_jax.base.phases import phase


def precheck(args) -> None:
    """Before JAX is imported: a task offline without its data is refused in seconds."""
    if args.tasks:
        from mone_jax.app.harness_env import quick_check

        quick_check([t.strip() for t in args.tasks.split(",") if t.strip()], args.include_path)


def run(args) -> None:
    if (args.data is None) == (args.tasks is None):
        raise UserError("give --data (perplexity) or --tasks (lm-evaluation-harness tasks), not both or neither")
    if args.tasks is not None:
        return _tasks(args)
    from mone_jax.app.data import load_token_blocks
    from mone_jax.app.jobs import file_out
    from mone_jax.evaluate.perplexity import perplexity

    if args.data == "self":
        raise UserError("evaluate on held-out data (a file, folder, .npy or hf:NAME), not on the model's own samples")
    from mone_jax.convert.load import config_of

    cfg = config_of(args.model)
    if args.seq_len > cfg.max_position_embeddings:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                        f"{cfg.max_position_embeddings}: lower --seq-len")
    file_out(args.result_out)
    phase("data", f"reading {args.data} into {args.num_samples} blocks of {args.seq_len} tokens")
    ids = load_token_blocks(args.data, tokenizer_dir=args.model, num_samples=args.num_samples, seq_len=args.seq_len,
                            text_field=args.text_field, vocab_size=cfg.vocab_size, seed=args.seed or 0,
                            contiguous=args.seed is None)
    model = load_model(args)
    result = perplexity(model, ids, batch_size=args.batch_size, progress=args.progress)
    result.update(model=args.model, data=args.data, num_samples=int(ids.shape[0]), seq_len=int(ids.shape[1]),
                  seed=args.seed)
    if args.result_out:
        atomic_write_text(args.result_out, json.dumps(result, indent=1) + "\n")
    print(f"perplexity {result['perplexity']:.4f} (mean NLL {result['nll']:.5f}) over {result['tokens']} tokens")


def _tasks(args) -> None:
    from mone_jax.app.distributed import init_distributed, is_writer
    from mone_jax.app.hub import same_revision

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks is empty: name lm-eval tasks, e.g. --tasks arc_easy,piqa")
    init_distributed(args)
    same_revision(args.model)
    from mone_jax.app.harness import evaluate_tasks, markdown, write_results
    results = evaluate_tasks(args.model, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                             include_path=args.include_path, batch_size=args.batch_size, mesh=args.mesh,
                             dtype=args.dtype, seed=args.seed or 0, progress=args.progress,
                             log_level="error" if args.quiet else "debug" if args.debug else "warning")
    print(markdown(results))
    if args.out and is_writer():
        paths = write_results(results, args.out)
        print(f"wrote {paths[0]} and {paths[1]}")
