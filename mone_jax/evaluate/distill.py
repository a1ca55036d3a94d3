"""``--fit kd``: after a plan is applied, fit the pruned model's novice vectors, MoE routers (weight and bias)
and MoE-input norm scales to the original model's next-token distribution.

The loss is KL(teacher || student) per predicted position, averaged, on calibration blocks; the teacher's
log-probabilities are computed per batch and never kept for the whole set. Adam (optax) fits only those
tensors (Router KD, arXiv 2603.02217, fits the routers alone after pruning); every ``eval_every`` steps the
KL on the validation blocks is measured, and the fit stops once it has not improved for ``patience``
measurements (or after ``max_steps``), returning the tensors of the best measurement.
"""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from mone_jax.base.errors import UserError
from mone_jax.model.causal_lm import MoEForCausalLM

FITTED = ("novice_values", "router", "router_bias")  # per MoE block; plus the norm before it (pre-norm layers)


def fitted_path(model: MoEForCausalLM, path: tuple) -> bool:
    """Whether the state entry at ``path`` is fitted: a MoE block's novices, router weight and bias, or the
    weight of the norm feeding it."""
    if len(path) < 3 or path[0] != "layers" or not model.layers[int(path[1])].is_moe:
        return False
    if path[2] == "mlp":
        return len(path) == 4 and path[3] in FITTED
    return path[2] == "post_attention_layernorm" and path[-1] == "weight" and not model.layers[int(path[1])].post_norm


def _logp(model: MoEForCausalLM, ids: jax.Array) -> jax.Array:
    """float32 log-probabilities of the next token at every position but the last: [B, T - 1, vocab]."""
    return jax.nn.log_softmax(model(ids)[:, :-1].astype(jnp.float32), -1)


@partial(jax.jit, static_argnums=0)
def _teacher(graphdef, state, ids):
    return _logp(nnx.merge(graphdef, state), ids)


def _kl(graphdef, train, rest, ids, teacher):
    student = _logp(nnx.merge(graphdef, train, rest), ids)
    return jnp.mean(jnp.sum(jnp.exp(teacher) * (teacher - student), -1))


@partial(jax.jit, static_argnums=(0, 1))
def _step(graphdef, tx, train, rest, opt, ids, teacher):
    loss, grads = jax.value_and_grad(_kl, argnums=1)(graphdef, train, rest, ids, teacher)
    updates, opt = tx.update(grads, opt, train)
    return optax.apply_updates(train, updates), opt, loss


_kl_jit = jax.jit(_kl, static_argnums=0)


def distill(teacher: MoEForCausalLM, student: MoEForCausalLM, train_ids: np.ndarray, valid_ids: np.ndarray, *,
            lr: float = 1e-3, batch_size: int = 8, max_steps: int = 200, eval_every: int = 5, patience: int = 3,
            seed: int = 0, progress: bool = True) -> dict:
    """Fit ``student`` (a pruned model, updated in place) to ``teacher`` on token blocks ``train_ids`` [N, T],
    stopping early on the KL over ``valid_ids`` (module docstring). Returns the record: steps run, the step
    kept, the validation KL before and after, and the seconds."""
    if student.config.num_layers != teacher.config.num_layers or student.config.vocab_size != teacher.config.vocab_size:
        raise UserError("the student is not a pruned copy of the teacher")
    t0 = time.perf_counter()
    t_graph, t_state = nnx.split(teacher)
    graphdef, train, rest = nnx.split(student, lambda path, _: fitted_path(student, path), ...)
    tx = optax.adam(lr)
    opt = tx.init(train)
    bs = max(1, min(batch_size, len(train_ids)))

    def valid_kl(params) -> float:
        total = 0.0
        for i in range(0, len(valid_ids), bs):
            ids = jnp.asarray(valid_ids[i:i + bs], jnp.int32)
            total += float(_kl_jit(graphdef, params, rest, ids, _teacher(t_graph, t_state, ids))) * len(ids)
        return total / len(valid_ids)

    rng = np.random.default_rng(seed)
    order = np.zeros(0, np.int64)
    start = best = valid_kl(train)
    best_state, best_step, stale, step = train, 0, 0, 0
    bar = tqdm(total=max_steps, desc="distilling (kd)", unit="step", disable=not progress)
    while step < max_steps and stale < patience:
        if len(order) < bs:
            order = np.concatenate([order, rng.permutation(len(train_ids))])
        rows, order = order[:bs], order[bs:]
        ids = jnp.asarray(train_ids[np.sort(rows)], jnp.int32)
        train, opt, _ = _step(graphdef, tx, train, rest, opt, ids, _teacher(t_graph, t_state, ids))
        step += 1
        bar.update()
        if step % eval_every == 0:
            kl = valid_kl(train)
            if kl < best:
                best, best_state, best_step, stale = kl, train, step, 0
            else:
                stale += 1
            bar.set_postfix_str(f"validation KL {kl:.4f} (best {best:.4f} at step {best_step})", refresh=False)
    bar.close()
    nnx.update(student, best_state)
    return {"method": "kd", "lr": lr, "steps": step, "best_step": best_step, "validation_kl_before": start,
            "validation_kl_after": best, "seconds": time.perf_counter() - t0}
