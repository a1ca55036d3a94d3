"""Dispatch implementations against the dense oracle and a float64 NumPy loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mone_jax.model.moe import IMPLS, Experts, dispatch


def _setup(T=40, d=16, f=8, E=6, k=2, seed=0, ids=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, d)).astype(np.float32)
    ex = Experts(jnp.asarray(rng.normal(size=(E, 2 * f, d)) * 0.3, jnp.float32),
                 jnp.asarray(rng.normal(size=(E, d, f)) * 0.3, jnp.float32))
    if ids is None:
        ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
    w = rng.random(ids.shape).astype(np.float32)
    return jnp.asarray(x), ex, jnp.asarray(ids), jnp.asarray(w)


def _numpy_reference(x, ex, ids, w, mask):
    x, ids, w = np.asarray(x, np.float64), np.asarray(ids), np.asarray(w, np.float64)
    gu, dn = np.asarray(ex.gate_up, np.float64), np.asarray(ex.down, np.float64)
    E, f = gu.shape[0], dn.shape[2]
    y = np.zeros_like(x)
    outs: dict[int, list] = {e: [] for e in range(E)}
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            if e >= E:
                continue
            h = gu[e] @ x[t]  # [out, in] weights
            o = dn[e] @ (h[:f] / (1 + np.exp(-h[:f])) * h[f:])
            y[t] += w[t, j] * o
            if mask[t]:
                outs[e].append((o, w[t, j]))
    return y, outs


@pytest.mark.parametrize("case", ["random", "empty_and_full", "skips"])
@pytest.mark.parametrize("block", [None, 8])
def test_impls_agree_with_numpy(case, block):
    T, E, k = 40, 6, 2
    ids = None
    if case == "empty_and_full":  # expert 0 gets every token, expert 5 none
        rng = np.random.default_rng(3)
        ids = np.stack([np.r_[0, rng.integers(1, E - 1)] for _ in range(T)]).astype(np.int32)
    x, ex, ids, w = _setup(T=T, E=E, k=k, ids=ids)
    if case == "skips":  # id E = skip (novice / dropped pair)
        ids = ids.at[::3, 1].set(E)
    mask = np.ones(T, bool)
    mask[-7:] = False
    y_ref, outs = _numpy_reference(x, ex, ids, w, mask)
    for impl in IMPLS:
        y, st = jax.jit(lambda x, i, w, impl=impl: dispatch(x, i, w, ex, impl=impl, block=block,
                                                            stats_mask=jnp.asarray(mask)))(x, ids, w)
        np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5, err_msg=impl)
        for e in range(E):
            rows = outs[e]
            assert int(st.count[e]) == len(rows), (impl, e)
            if not rows:
                assert float(st.weight_sum[e]) == 0 and np.all(np.asarray(st.mean[e]) == 0)
                continue
            ys = np.stack([r[0] for r in rows])
            np.testing.assert_allclose(float(st.weight_sum[e]), sum(r[1] for r in rows), rtol=1e-5)
            np.testing.assert_allclose(np.asarray(st.mean[e]), ys.mean(0), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(np.asarray(st.m2[e]), ((ys - ys.mean(0)) ** 2).sum(0), rtol=1e-4, atol=1e-5)
            reap = sum(r[1] * np.linalg.norm(r[0]) for r in rows)
            np.testing.assert_allclose(float(st.reap_sum[e]), reap, rtol=1e-5)
            np.testing.assert_allclose(float(st.norm_sum[e]), sum(np.linalg.norm(r[0]) for r in rows), rtol=1e-5)
        if case == "empty_and_full":
            assert int(st.count[0]) == mask.sum() and int(st.count[E - 1]) == 0


def test_dispatch_without_stats_matches_dense():
    x, ex, ids, w = _setup(T=33, E=5, k=3)
    ys = [np.asarray(dispatch(x, ids, w, ex, impl=i)[0]) for i in IMPLS]
    for y in ys[1:]:
        np.testing.assert_allclose(y, ys[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_scan_is_differentiable():
    """The demo model trains through the scan dispatch: its gradient equals the dense one's."""
    x, ex, ids, w = _setup(T=20, E=4, k=2)

    def loss(ex, impl):
        return jnp.sum(dispatch(x, ids, w, ex, impl=impl)[0] ** 2)

    g_scan = jax.grad(loss)(ex, "scan")
    g_dense = jax.grad(loss)(ex, "dense")
    for a, b in zip(g_scan, g_dense):
        if a is not None:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
