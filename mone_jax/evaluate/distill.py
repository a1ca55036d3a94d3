"""``--fit kd`` / ``kd-down``: after a plan is applied, fit the pruned model's novice vectors, MoE routers (weight
and bias) and MoE-input norm scales (``kd-down``: also the kept experts' down projections) to the original model's
next-token distribution.

The loss is KL(teacher || student) per predicted position, averaged over the real rows of calibration batches
(padding rows, there to fill a mesh's devices, weigh nothing); the teacher's log-probabilities are computed inside
each step for its batch and never kept for the whole set. Adam (optax) fits only those
tensors (Router KD, arXiv 2603.02217, fits the routers alone after pruning), its rate rising linearly from 0 to
``lr`` over ``warmup`` steps, then falling along a cosine to ``end_lr`` at ``max_steps``: a constant rate high
enough to gain on the demo made the first measurements worse than the start, and a lower one stopped short.
Every ``eval_every`` steps the KL on the validation blocks is measured, and the fit stops once it has not
improved for ``patience`` measurements taken after the warm-up (or at ``max_steps``), returning the tensors of
the best measurement.
"""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from mone_jax.base.errors import UserError
from mone_jax.calib.calibration import shard_batch
from mone_jax.model.causal_lm import MoEForCausalLM
from mone_jax.model.sharding import padded_rows, spread

FITTED = {  # per distillation (planning.DISTILLED, which says them in words): a MoE block's fitted arrays, plus
    # the norm feeding it
    "kd": ("novice_values", "router", "router_bias"),
    # the kept experts' down projections too: on the demo at 25% this halves what kd leaves (README); Adam then
    # holds two moments (in the model's dtype) of every kept expert's down projection
    "kd-down": ("novice_values", "router", "router_bias", "down", "down_bias"),
}


def fitted_path(model: MoEForCausalLM, path: tuple, method: str = "kd") -> bool:
    """Whether the state entry at ``path`` is fitted by distillation ``method``: one of a MoE block's arrays
    ``FITTED[method]``, or the weight of the norm feeding the block."""
    if len(path) < 3 or path[0] != "layers" or not model.layers[int(path[1])].is_moe:
        return False
    if path[2] == "mlp":
        return len(path) == 4 and path[3] in FITTED[method]
    return path[2] == "post_attention_layernorm" and path[-1] == "weight" and not model.layers[int(path[1])].post_norm


def _logp(model: MoEForCausalLM, ids: jax.Array) -> jax.Array:
    """float32 log-probabilities of the next token at every position but the last: [B, T - 1, vocab]."""
    return jax.nn.log_softmax(model(ids)[:, :-1].astype(jnp.float32), -1)


def _kl_sum(graphdef, train, rest, t_graph, t_state, ids, real):
    """KL(teacher || student) summed over the predicted positions of the real rows (``real`` [B]: 1, padding 0);
    the teacher's log-probabilities are made here, for this batch only."""
    teacher = jax.lax.stop_gradient(_logp(nnx.merge(t_graph, t_state), ids))
    student = _logp(nnx.merge(graphdef, train, rest), ids)
    return jnp.sum(jnp.sum(jnp.exp(teacher) * (teacher - student), -1) * real[:, None])


def _kl_mean(graphdef, train, rest, t_graph, t_state, ids, real):
    return _kl_sum(graphdef, train, rest, t_graph, t_state, ids, real) / (jnp.sum(real) * (ids.shape[1] - 1))


@partial(jax.jit, static_argnums=(0, 3, 5))
def _step(graphdef, train, rest, t_graph, t_state, tx, opt, ids, real):
    loss, grads = jax.value_and_grad(_kl_mean, argnums=1)(graphdef, train, rest, t_graph, t_state, ids, real)
    updates, opt = tx.update(grads, opt, train)
    return optax.apply_updates(train, updates), opt, loss


_kl_jit = jax.jit(_kl_sum, static_argnums=(0, 3))


class _Rows:
    """Batches of ``rows`` real token rows padded to ``padded`` (a multiple of the mesh's devices) with masked
    rows, split over the mesh as calibration splits them (one device: as they are)."""

    def __init__(self, rows: int, mesh: Mesh | None):
        self.mesh, self.padded = mesh, rows if mesh is None else padded_rows(rows, mesh)

    def __call__(self, ids: np.ndarray) -> tuple[jax.Array, jax.Array]:
        real = np.zeros(self.padded, np.float32)
        real[:len(ids)] = 1.0
        ids = np.concatenate([ids, np.zeros((self.padded - len(ids), ids.shape[1]), ids.dtype)]).astype(np.int32)
        if self.mesh is None:
            return jnp.asarray(ids), jnp.asarray(real)
        return shard_batch(ids, self.mesh), shard_batch(real, self.mesh)


def distill(teacher: MoEForCausalLM, student: MoEForCausalLM, train_ids: np.ndarray, valid_ids: np.ndarray, *,
            lr: float = 3e-3, batch_size: int = 8, max_steps: int = 120, eval_every: int = 10, patience: int = 3,
            seed: int = 0, progress: bool = True, mesh: Mesh | None = None, warmup: int = 20,
            end_lr: float = 3e-5, method: str = "kd") -> dict:
    """Fit ``student``'s arrays of ``method`` (``FITTED``; the student is a pruned model, updated in place) to
    ``teacher`` on token blocks ``train_ids`` [N, T], stopping early on the KL over ``valid_ids`` (module
    docstring). With a ``mesh``, every batch's rows are split over its devices (padded with masked rows to a
    multiple of them), both models are laid out on it (:func:`~mone_jax.model.sharding.spread`, in place) and
    jit partitions the steps, reducing the gradients. Returns the record: the method, steps run, the step kept,
    the validation KL before and after, and the seconds."""
    if student.config.num_layers != teacher.config.num_layers or student.config.vocab_size != teacher.config.vocab_size:
        raise UserError("the student is not a pruned copy of the teacher")
    if method not in FITTED:
        raise UserError(f"unknown distillation '{method}': use one of {', '.join(FITTED)}")
    t0 = time.perf_counter()
    bs = max(1, min(batch_size, len(train_ids)))
    rows = _Rows(bs, mesh)
    if mesh is not None:
        spread(teacher, mesh)
        spread(student, mesh)
    t_graph, t_state = nnx.split(teacher)
    graphdef, train, rest = nnx.split(student, lambda path, _: fitted_path(student, path, method), ...)
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(max_steps, warmup + 1), end_lr))
    opt = tx.init(train)

    def valid_kl(params) -> float:
        total = 0.0
        for i in range(0, len(valid_ids), bs):
            ids, real = rows(valid_ids[i:i + bs])
            total += float(_kl_jit(graphdef, params, rest, t_graph, t_state, ids, real))
        return total / (len(valid_ids) * (valid_ids.shape[1] - 1))

    rng = np.random.default_rng(seed)
    order = np.zeros(0, np.int64)
    start = best = valid_kl(train)
    best_state, best_step, stale, step = train, 0, 0, 0
    bar = tqdm(total=max_steps, desc=f"distilling ({method})", unit="step", disable=not progress)
    while step < max_steps and stale < patience:
        if len(order) < bs:
            order = np.concatenate([order, rng.permutation(len(train_ids))])
        picked, order = order[:bs], order[bs:]
        ids, real = rows(train_ids[np.sort(picked)])
        train, opt, _ = _step(graphdef, train, rest, t_graph, t_state, tx, opt, ids, real)
        step += 1
        bar.update()
        if step % eval_every == 0:
            kl = valid_kl(train)
            if kl < best:
                best, best_state, best_step, stale = kl, train, step, 0
            elif step > warmup:  # a measurement while the rate still rises is not held against the fit
                stale += 1
            bar.set_postfix_str(f"validation KL {kl:.4f} (best {best:.4f} at step {best_step})", refresh=False)
    bar.close()
    nnx.update(student, best_state)
    return {"method": method, "lr": lr, "warmup": warmup, "end_lr": end_lr, "steps": step, "best_step": best_step,
            "validation_kl_before": start, "validation_kl_after": best, "seconds": time.perf_counter() - t0}
