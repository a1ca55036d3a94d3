"""Checks and data that several test files share (kept out of the test files, which never import each other)."""

from __future__ import annotations

import math

import numpy as np
from reference import FIELDS_F64, METRICS_F64, REFERENCE_METRICS_F64, Routed

from mone_jax.base.stats import FIELDS, FLOATS, NAMES, REFERENCE, Stats
from mone_jax.evaluate.perplexity import predicted
from mone_jax.pruning.scoring import REGISTRY, layer_scores


def calib_batches(vocab: int, sizes=((2, 12), (3, 12)), pad: bool = True, seed: int = 0):
    """(ids, mask) pairs of ``sizes``; the first row of each ends in 4 padding tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for b, t in sizes:
        ids = rng.integers(0, vocab, (b, t)).astype(np.int32)
        mask = np.ones((b, t), np.int32)
        if pad:
            mask[0, t - 4:] = 0
        out.append((ids, mask))
    return out


def mesh_batches(vocab: int, seed: int = 0) -> list[dict]:
    """Batches of 5 rows (padded to the data axis) with some padding tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        ids = rng.integers(0, vocab, (5, 16)).astype(np.int32)
        mask = np.ones((5, 16), np.int32)
        mask[0, 11:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def assert_close(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    scale = np.abs(theirs).max() + 1e-12
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * scale, err_msg=what)


def assert_stats_match(stats: Stats, ref: dict[int, Routed], tokens: int, reference: bool = True) -> None:
    """Every statistic of FIELDS and every statistics metric of the registry (under each semantics it has)
    equals its float64 formula in tests/reference.py; one without a formula fails here. ``reference`` False:
    statistics read back from an exact-semantics file, which holds no reference fields (REFERENCE)."""
    assert not (lacking := set(NAMES) - set(FIELDS_F64)), f"statistics without a float64 formula: {lacking}"
    stats_metrics = {k: m for k, m in REGISTRY.items() if not m.needs_weights}
    assert not (lacking := set(stats_metrics) - set(METRICS_F64)), f"metrics without a float64 formula: {lacking}"
    with_ref = {k for k, m in stats_metrics.items() if m.reference is not None}
    assert not (lacking := with_ref - set(REFERENCE_METRICS_F64)), f"reference semantics without a formula: {lacking}"
    fields = [f for f in FIELDS if reference or f.name not in REFERENCE]
    assert stats.tokens == tokens
    assert sorted(stats.layers) == sorted(ref)
    for i, r in ref.items():
        s = stats.layers[i]
        for f in fields:
            ours, theirs = getattr(s, f.name), FIELDS_F64[f.name](r)
            if f.kind in ("count", "ref_count"):
                np.testing.assert_array_equal(ours, theirs, err_msg=f"layer {i} {f.name}")
            else:
                assert_close(ours, theirs, f"layer {i} {f.name}")
        for name in stats_metrics:
            assert_close(layer_scores(s, tokens, name, np.random.default_rng(7)), METRICS_F64[name](r, np.random.default_rng(7)),
                   f"layer {i} metric {name}")
        for name in with_ref if reference else ():
            assert_close(layer_scores(s, tokens, name, semantics="reference"), REFERENCE_METRICS_F64[name](r, None),
                   f"layer {i} metric {name} (reference semantics)")


def assert_stats_equal(got: Stats, ref: Stats, rtol: float = 4e-6) -> None:
    """Counts and tokens exact; every float tensor within rtol of its own magnitude (max |ref|): float32 sums
    taken in another order (split over devices, fused otherwise) differ by up to ~1.2e-6 of it here."""
    assert got.tokens == ref.tokens and sorted(got.layers) == sorted(ref.layers)
    for i, r in ref.layers.items():
        g = got.layers[i]
        np.testing.assert_array_equal(g.count, r.count, err_msg=f"layer {i} count")
        for f in (f for f in FLOATS if f not in REFERENCE):  # per-call recurrence: batch-split dependent
            a, b = getattr(g, f), getattr(r, f)
            assert np.abs(a - b).max() <= rtol * np.abs(b).max(), f"layer {i} {f}"


def assert_identical(a: Stats, b: Stats) -> None:
    """Bit-identical statistics: every field of every layer."""
    assert a.tokens == b.tokens and sorted(a.layers) == sorted(b.layers)
    for i in a.layers:
        for f in NAMES:
            np.testing.assert_array_equal(getattr(a.layers[i], f), getattr(b.layers[i], f), err_msg=f"{i} {f}")


def hf_perplexity(model, ids: np.ndarray, mask: np.ndarray) -> float:
    """exp(mean NLL) of the predicted tokens, from transformers' logits (float64 log-softmax)."""
    import torch

    with torch.no_grad():
        logits = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1)
    nll = -logp.gather(-1, torch.as_tensor(ids[:, 1:, None], dtype=torch.long))[..., 0].numpy()
    return math.exp(nll[predicted(mask)].mean())
