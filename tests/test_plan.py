"""Scores and plans on constructed statistics (docs/formats.md), plus property tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mone_jax.base.config import ModelConfig, RopeConfig
from mone_jax.base.errors import UserError
from mone_jax.base.stats import LayerStats, Stats
from mone_jax.pruning import planning
from mone_jax.pruning.planning import Plan
from mone_jax.pruning.scoring import METRICS, REGISTRY

STATS_METRICS = [m for m in METRICS if not REGISTRY[m].needs_weights]


def make_plan(stats: Stats, **kw) -> dict:
    """The plan as its JSON object (docs/formats.md)."""
    return planning.make_plan(stats, **kw).to_dict()


def _stats(counts, wsums, vars_, tokens=100, d=3, reap=None, norm=None) -> Stats:
    layers = {}
    for i, (c, w, v) in enumerate(zip(counts, wsums, vars_)):
        c = np.asarray(c, np.int64)
        m2 = np.asarray(v, np.float64)[:, None] * np.ones(d) / d * np.maximum(c - 1, 0)[:, None]
        r = np.zeros(len(c)) if reap is None else np.asarray(reap[i], np.float64)
        nrm = np.zeros(len(c)) if norm is None else np.asarray(norm[i], np.float64)
        layers[2 * i + 1] = LayerStats(c, np.asarray(w, np.float64), np.zeros((len(c), d)), m2, r, nrm)
    return Stats(layers, tokens, {"model_type": "olmoe"})


def test_mone_score_formula_and_layer_plan():
    # sum_d var = v exactly, so score = (wsum / tokens) * sqrt(v)
    s = _stats([[10, 10, 10, 1]], [[5.0, 1.0, 2.0, 50.0]], [[4.0, 100.0, 1.0, 9.0]], tokens=10)
    plan = make_plan(s, keep=2)
    expected = np.array([0.5 * 2, 0.1 * 10, 0.2 * 1, 0.0])  # count < 2 -> var 0 -> score 0
    np.testing.assert_allclose(plan["layers"]["1"]["scores"], expected)
    # 0 and 1 tie at 1.0: both kept; the plan lists ids ascending
    assert plan["layers"]["1"] == {"kept": [0, 1], "novices": [2, 3], "scores": plan["layers"]["1"]["scores"]}
    assert plan["metric"] == "mone" and plan["scope"] == "layer" and plan["keep"] == 2


def test_ties_go_to_lower_index_and_exactly_n_kept():
    s = _stats([[5] * 6], [[1.0] * 6], [[1.0] * 6])
    for n in range(1, 7):
        assert make_plan(s, keep=n)["layers"]["1"]["kept"] == list(range(n))


@pytest.mark.parametrize("metric", STATS_METRICS)
def test_each_metric(metric):
    counts = [[1, 40, 30, 20]]
    wsum = [[0.5, 4.0, 9.0, 2.0]]
    var = [[0.0, 1.0, 25.0, 4.0]]
    reap = [[0.1, 8.0, 3.0, 6.0]]
    norm = [[0.3, 80.0, 150.0, 10.0]]
    s = _stats(counts, wsum, var, tokens=50, reap=reap, norm=norm)
    sc = np.array(make_plan(s, keep=2, metric=metric, seed=3)["layers"]["1"]["scores"])
    expected = {
        "mone": np.array(wsum[0]) / 50 * np.sqrt(var[0]),
        "frequency": np.array(counts[0]) / 50,
        "routing-score": np.array(wsum[0]) / 50,
        "variance": np.sqrt(var[0]),
        "reap": np.array(reap[0]) / np.array(counts[0]),
        "man": np.array(norm[0]) / np.array(counts[0]),
        "msan": np.array(var[0]) * (np.array(counts[0]) - 1) / np.array(counts[0]),  # the means are 0
        "random": np.random.default_rng(3).random(4),
    }[metric]
    np.testing.assert_allclose(sc, expected, rtol=1e-12)


def test_model_scope_keeps_round_n_layers_total_at_least_one_per_layer():
    s = _stats([[10] * 4, [10] * 4, [10] * 4],
               [[9, 8, 7, 6], [0.1, 0.2, 0.3, 0.4], [5, 5, 0.5, 0.5]], [[1] * 4] * 3, tokens=10)
    plan = make_plan(s, keep=2, scope="model")
    kept = {k: v["kept"] for k, v in plan["layers"].items()}
    assert sum(len(v) for v in kept.values()) == 6
    assert kept["1"] == [0, 1, 2, 3]  # the best four scores overall live in layer 1 ...
    assert kept["3"] == [3]  # ... but every layer keeps at least its best expert
    assert kept["5"] == [0]  # ties (5, 5) -> lower expert index


def test_ratio_and_bad_arguments():
    s = _stats([[3] * 8], [[1.0] * 8], [[1.0] * 8])
    assert make_plan(s, ratio=0.25)["keep"] == 6
    assert make_plan(s, ratio=0.5)["keep"] == 4
    assert make_plan(s, ratio=0.0)["keep"] == 8
    for kw in [dict(keep=0), dict(keep=9), dict(ratio=1.0), dict(ratio=-0.1), dict(keep=2, ratio=0.5),
               dict(keep=2, metric="nope"), dict(keep=2, scope="nope")]:
        with pytest.raises(UserError):
            make_plan(s, **kw)


@given(E=st.integers(2, 12), L=st.integers(1, 4), n=st.integers(1, 12), seed=st.integers(0, 10_000),
       metric=st.sampled_from(STATS_METRICS), scope=st.sampled_from(["layer", "model"]))
def test_plan_invariants(E, L, n, seed, metric, scope):
    n = min(n, E)
    rng = np.random.default_rng(seed)
    s = _stats(rng.integers(0, 20, (L, E)), rng.random((L, E)), rng.random((L, E)), reap=rng.random((L, E)))
    plan = make_plan(s, keep=n, metric=metric, scope=scope, seed=seed)
    total = 0
    for v in plan["layers"].values():
        assert sorted(v["kept"] + v["novices"]) == list(range(E))  # kept and novices partition the experts
        assert v["kept"] == sorted(v["kept"]) and v["novices"] == sorted(v["novices"])
        assert len(v["kept"]) >= 1
        if scope == "layer":
            assert len(v["kept"]) == n
        total += len(v["kept"])
    if scope == "model":
        assert total == max(L, round(n * L))
    assert make_plan(s, keep=n, metric=metric, scope=scope, seed=seed) == plan  # deterministic for a seed


@given(seed=st.integers(0, 10_000), cuts=st.lists(st.integers(1, 59), max_size=6))
def test_merge_is_split_invariant(seed, cuts):
    """Chan merge: any split of the tokens into batches gives the moments of the whole (float64 loop)."""
    rng = np.random.default_rng(seed)
    E, d, N = 3, 4, 60
    e_of = rng.integers(0, E, N)
    y = rng.normal(size=(N, d)) * rng.uniform(0.1, 100)
    w = rng.random(N)
    bounds = [0, *sorted(set(cuts)), N]

    def batch(lo, hi):
        c = np.zeros(E, np.int64)
        ws, mean, m2, reap, nrm = np.zeros(E), np.zeros((E, d)), np.zeros((E, d)), np.zeros(E), np.zeros(E)
        for e in range(E):
            sel = (e_of[lo:hi] == e)
            ys = y[lo:hi][sel]
            c[e] = len(ys)
            if len(ys):
                ws[e] = w[lo:hi][sel].sum()
                mean[e] = ys.mean(0)
                m2[e] = ((ys - ys.mean(0)) ** 2).sum(0)
                reap[e] = (w[lo:hi][sel] * np.linalg.norm(ys, axis=1)).sum()
                nrm[e] = np.linalg.norm(ys, axis=1).sum()
        return Stats({0: LayerStats(c, ws, mean, m2, reap, nrm)}, hi - lo)

    acc = batch(0, 0)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        acc = acc.merge(batch(lo, hi))
    whole = batch(0, N)
    np.testing.assert_array_equal(acc.layers[0].count, whole.layers[0].count)
    for f in ("weight_sum", "mean", "m2", "reap_sum", "norm_sum"):
        np.testing.assert_allclose(getattr(acc.layers[0], f), getattr(whole.layers[0], f), rtol=1e-9, atol=1e-9)
    assert acc.tokens == N


def _cfg(E=8, top_k=2, n_group=1, topk_group=1, group_score="top2") -> ModelConfig:
    """A model whose layers 1 and 3 are MoE layers (sizes irrelevant to a plan)."""
    return ModelConfig("deepseek_v3", 96, 32, 4, 4, 4, 16, 40, 1e-6, 256, False, RopeConfig(),
                       moe_layers=(False, True, False, True), num_experts=E, top_k=top_k, n_group=n_group,
                       topk_group=topk_group, group_score=group_score)


def _plan(*kept_per_layer, E=8) -> Plan:
    return Plan.from_dict({"layers": {str(i): {"kept": k, "novices": [e for e in range(E) if e not in k]}
                                      for i, k in zip((1, 3), kept_per_layer)}})


def test_drop_plan_keeps_the_best_of_every_group():
    # frequency scores: the best four experts overall all lie in ids 0..3
    s = _stats([[9, 8, 7, 6, 1, 2, 2, 0]], [[1.0] * 8], [[1.0] * 8], tokens=10)
    assert make_plan(s, keep=4, metric="frequency")["layers"]["1"]["kept"] == [0, 1, 2, 3]
    assert make_plan(s, keep=4, metric="frequency", n_group=2)["layers"]["1"]["kept"] == [0, 1, 5, 6]  # tie: 5 < 6
    assert make_plan(s, keep=4, metric="frequency", n_group=4)["layers"]["1"]["kept"] == [0, 2, 5, 6]
    for kw in [dict(keep=3, n_group=2), dict(keep=4, n_group=2, scope="model")]:
        with pytest.raises(UserError, match="same number in every group"):
            make_plan(s, **kw)


@given(G=st.sampled_from([2, 4]), size=st.integers(2, 4), per=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_grouped_plans_pass_drop_validation(G, size, per, seed):
    per = min(per, size)
    E, rng = G * size, np.random.default_rng(seed)
    s = _stats(rng.integers(0, 20, (2, E)), rng.random((2, E)), rng.random((2, E)))
    plan = planning.make_plan(s, keep=G * per, n_group=G)
    cfg = _cfg(E, top_k=per, n_group=G, topk_group=1, group_score="max")
    assert plan.validate(cfg, "drop") is plan
    for lp in plan.layers.values():
        sc = np.asarray(lp.scores)
        for g in range(G):  # each group keeps its best `per` (ties: lower id), by a plain loop
            ids = list(range(g * size, (g + 1) * size))
            want = sorted(sorted(ids, key=lambda e: (-sc[e], e))[:per])
            assert [e for e in lp.kept if e in ids] == want


@pytest.mark.parametrize("plan, cfg, match", [
    (_plan([0, 1, 2, 3], [0, 1, 4, 5]), _cfg(n_group=2), "keeps \\[4, 0\\] experts in the router's 2 groups"),
    (_plan([0, 1, 4], [0, 1, 4]), _cfg(n_group=2), "multiple of the router's n_group = 2"),
    (_plan([0, 4], [1, 5]), _cfg(n_group=2, top_k=2), "1 experts in each of the router's 2 groups, too few"),
    (_plan([0, 1, 4, 5], [0, 1, 4, 5]), _cfg(n_group=2, top_k=3), "too few for top-k = 3 from 1 groups"),
    (_plan([0, 1], [0, 1, 2]), _cfg(), "same keep count in every layer"),
    (_plan([0], [1]), _cfg(top_k=2), "at least top-k = 2"),
])
def test_drop_validation_refuses(plan, cfg, match):
    with pytest.raises(UserError, match=match):
        plan.validate(cfg, "drop")


def test_validation_against_the_model():
    assert _plan([0, 1, 2, 3], [0, 1, 4, 5]).validate(_cfg(n_group=2), "substitute")  # groups: drop only
    assert _plan([0, 4], [1, 5]).validate(_cfg(n_group=2, topk_group=2, top_k=2, group_score="max"), "drop")
    with pytest.raises(UserError, match="partition experts 0..7"):
        _plan([0, 1], [0, 1], E=4).validate(_cfg(), "substitute")
    with pytest.raises(UserError, match="lacks MoE layers \\[3\\]"):
        Plan.from_dict({"layers": {"1": {"kept": [0], "novices": list(range(1, 8))}}}).validate(_cfg())
    with pytest.raises(UserError, match="plan layer 2 is not a MoE layer"):
        Plan.from_dict({"layers": {str(i): {"kept": [0], "novices": list(range(1, 8))} for i in (1, 2, 3)}}).validate(
            _cfg())
    with pytest.raises(UserError, match="unknown prune mode"):
        _plan([0], [0]).validate(_cfg(), "gguf")


@pytest.mark.parametrize("bad", [[], {"layers": {}}, {"layers": {"x": {"kept": [0], "novices": []}}},
                                 {"layers": {"1": {"kept": [0]}}}, {"layers": {"1": {"kept": [True], "novices": []}}},
                                 {"layers": {"1": {"kept": [0.0], "novices": []}}},
                                 {"layers": {"1": {"kept": [0], "novices": [], "scores": ["a"]}}}])
def test_malformed_plans_are_refused(bad):
    with pytest.raises(UserError, match="plan"):
        Plan.from_dict(bad)


def test_json_round_trip(tmp_path):
    s = _stats([[10, 10, 10, 1]], [[5.0, 1.0, 2.0, 50.0]], [[4.0, 100.0, 1.0, 9.0]], tokens=10)
    plan = planning.make_plan(s, keep=2)
    plan.save(tmp_path / "p.json")
    d = json.loads((tmp_path / "p.json").read_text())
    assert d == {"metric": "mone", "scope": "layer", "keep": 2,
                 "layers": {"1": {"kept": [0, 1], "novices": [2, 3], "scores": d["layers"]["1"]["scores"]}}}
    assert Plan.load(tmp_path / "p.json") == plan
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="is not a valid plan file"):
        Plan.load(tmp_path / "bad.json")
    with pytest.raises(UserError, match="does not exist"):
        Plan.load(tmp_path / "nope.json")
