"""lm-evaluation-harness on the Flax model: zero-/few-shot task accuracy without PyTorch.

:class:`JaxLM` is an ``lm_eval`` LM (registered as ``mone-jax``) that tokenizes requests exactly
as the harness's ``hf`` model does (its ``TemplateLM`` pairs, the same truncation to the model's
context) and scores them with :class:`~mone_jax.evaluate.loglik.TokenScorer`: requests sorted by length,
cut into fixed-size batches padded to power-of-two buckets, rows split over the device mesh.
``generate_until`` decodes greedily with :func:`mone_jax.model.decoding.generate`, its batches split over the
same mesh.

    from mone_jax.app.harness import evaluate_tasks
    results = evaluate_tasks("pruned_folder", ["arc_easy", "piqa"], num_fewshot=0)

Needs the optional extra ``pip install 'mone-jax[eval]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mone_jax.app.harness_env import check_task_data, harness_output, offline
from mone_jax.base.errors import UserError
from mone_jax.base.phases import Steps, phase

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (
        handle_stop_sequences,
        has_bos_prefix,
        normalize_gen_kwargs,
        postprocess_generated_text,
    )
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # pragma: no cover - depends on the installed extras
    raise UserError("zero-shot tasks need lm-evaluation-harness: pip install 'mone-jax[eval]'") from None


REPORT_EVERY = 10.0  # seconds between progress lines on a non-terminal


@register_model("mone-jax")
class JaxLM(TemplateLM):
    """An lm-eval LM backed by a mone-jax Flax model (any supported family, original or any export format).

    ``pretrained``: the Hugging Face folder or hub id ``ORG/NAME[@REVISION]``; ``mesh``: ``data=D,expert=X`` or
    ``auto`` (as ``calibrate``)
    or a :class:`jax.sharding.Mesh`; ``batch_size``: rows per batch (rounded up to the device count).
    """

    def __init__(self, pretrained: str, *, dtype: str = "float32", batch_size: int | str = 8, mesh=None,
                 max_gen_toks: int = 256, progress: bool = True, **_ignored) -> None:
        super().__init__()
        from mone_jax.app.data import load_tokenizer
        from mone_jax.app.hub import hub_id, snapshot
        from mone_jax.app.pipeline import model_mesh
        from mone_jax.convert.load import config_of, load_hf
        from mone_jax.evaluate.loglik import TokenScorer

        if (hub := hub_id(str(pretrained))) is not None:  # ORG/NAME[@REVISION] from Python or lm_eval's CLI
            pretrained = snapshot(*hub, progress=progress)
        if not Path(pretrained).is_dir():
            raise UserError(f"model folder '{pretrained}' does not exist")
        mesh_obj = model_mesh(config_of(pretrained), dtype, mesh) if mesh is None or isinstance(mesh, str) else mesh
        self.folder = str(pretrained)
        phase("load", f"the model in '{pretrained}' ({dtype})")
        self.model = load_hf(pretrained, dtype, mesh=mesh_obj, progress=progress)
        rows = 8 if str(batch_size).startswith("auto") else int(batch_size)  # lm_eval's CLI may say auto
        self.scorer = TokenScorer(self.model, mesh_obj, rows)
        self.tokenizer = load_tokenizer(pretrained)
        self._max_gen_toks = int(max_gen_toks)
        self.progress = progress

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids as the ``hf`` model encodes them (the tokenizer's own special tokens by default, none
        when the text already starts with the BOS string)."""
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **kw)

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's tokenization of the requests (its bar only with ``progress``), then :meth:`_loglikelihood_tokens`."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether every continuation token is the argmax) per
        ``((context, continuation), context_ids, continuation_ids)``; context + continuation left-truncated
        to ``max_length`` + 1 tokens, as the ``hf`` model does (the last token is only scored)."""
        items = []
        for _, ctx, cont in requests:
            if not 0 < len(cont) <= self.max_length:
                raise UserError(f"a continuation of {len(cont)} tokens cannot be scored within the model's "
                                f"{self.max_length}-token context")
            items.append(((list(ctx) + list(cont))[-(self.max_length + 1):], len(cont)))
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(items)
        rows = self.scorer.rows
        steps = Steps("score", len(items), "requests", bar=self.progress and not disable_tqdm, every=REPORT_EVERY)
        for start in range(0, len(order), rows):
            idx = order[start:start + rows]
            logp, greedy = self.scorer.score([items[i][0] for i in idx])
            for row, i in enumerate(idx):
                seq, n = items[i]
                span = slice(len(seq) - 1 - n, len(seq) - 1)  # position t scores token t + 1
                out[i] = (float(logp[row, span].astype(np.float64).sum()), bool(greedy[row, span].all()))
            steps.step(n=len(idx))
        steps.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in disjoint windows of the model's context (as ``hf``)."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += ll
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with a ``temperature``) continuations cut at the first stop string."""
        from mone_jax.model.decoding import generate

        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        steps = Steps("generate", len(requests), "requests", bar=self.progress and not disable_tqdm,
                      every=REPORT_EVERY)
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            new = int(kwargs.pop("max_gen_toks"))
            if new >= self.max_length:
                raise UserError(f"max_gen_toks {new} must be below the model's context of {self.max_length} tokens")
            prompts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - new):] for i in idx}
            idx = sorted(idx, key=lambda i: -len(prompts[i]))
            for start in range(0, len(idx), self.scorer.rows):
                part = idx[start:start + self.scorer.rows]
                tokens = generate(self.model, [prompts[i] for i in part], max_new_tokens=new,
                                  temperature=float(kwargs.get("temperature", 0.0)),
                                  seed=int(kwargs.get("seed", 0) or 0), eos_token_id=self.eot_token_id,
                                  pad_id=self.eot_token_id, mesh=self.scorer.mesh)
                for i, toks in zip(part, tokens):
                    toks = list(toks)
                    if self.eot_token_id in toks:
                        toks = toks[:toks.index(self.eot_token_id)]
                    out[i] = postprocess_generated_text(self.tok_decode(toks), until, None)
                steps.step(n=len(part))
        steps.close()
        return out


def evaluate_tasks(model: str | JaxLM, tasks: Sequence[str], *, num_fewshot: int | None = None,
                   limit: float | None = None, include_path: str | None = None, batch_size: int = 8,
                   mesh=None, dtype: str = "float32", log_samples: bool = False, seed: int = 0,
                   progress: bool = True, log_level: str = "warning") -> dict:
    """lm-eval's ``simple_evaluate`` on the JAX model: its results dict (``results``, ``configs``, ...;
    ``samples`` with ``log_samples``). Hub datasets that are neither cached nor reachable are refused first;
    lm-eval logs at ``log_level`` and shows bars only with ``progress``
    (:mod:`mone_jax.app.harness_env`)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include-path '{include_path}' is not a folder of task YAML files")
    phase("check", f"the tasks {', '.join(tasks)} and their datasets (indexing lm-eval's tasks)")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}: see `lm_eval ls tasks`, or give "
                        "--include-path for local task YAML files")
    run_offline = check_task_data(manager, list(tasks))
    lm = model if isinstance(model, JaxLM) else JaxLM(model, dtype=dtype, batch_size=batch_size, mesh=mesh,
                                                      progress=progress)
    phase("tasks", f"building the requests of {', '.join(tasks)} (lm-eval)")
    with offline(run_offline), harness_output(progress, log_level):
        results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=log_samples, random_seed=seed,
                                  numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    results["config"]["model"] = "mone-jax"
    results["config"]["model_args"] = f"pretrained={lm.folder}"
    return results


def write_results(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """``results.json`` (lm-eval's results format, without per-sample logs) and ``results.md`` in ``out_dir``."""
    import json

    from lm_eval.utils import handle_non_serializable

    from mone_jax.base.files import atomic_write_text

    out = Path(out_dir)
    summary = {k: v for k, v in results.items() if k != "samples"}
    paths = out / "results.json", out / "results.md"
    atomic_write_text(paths[0], json.dumps(summary, indent=2, default=handle_non_serializable) + "\n")
    atomic_write_text(paths[1], markdown(results))
    return paths


def markdown(results: dict) -> str:
    from lm_eval.utils import make_table

    table = make_table(results)
    if "groups" in results:
        table += "\n" + make_table(results, "groups")
    return table
