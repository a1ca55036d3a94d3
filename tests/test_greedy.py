"""``--scope greedy``: every step's choice against an independent replay on pruned models, the budget and the
per-layer floor, and the CLI's export against transformers."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from checks import hf_perplexity
from conftest import torch, transformers
from flax import nnx

from mone_jax.app.cli import main
from mone_jax.base.errors import UserError
from mone_jax.base.stats import Stats
from mone_jax.calib.calibration import calibrate
from mone_jax.convert.load import load_hf
from mone_jax.evaluate.distill import distill, fitted_path
from mone_jax.evaluate.greedy import greedy_plan, parse_candidates
from mone_jax.evaluate.perplexity import perplexity
from mone_jax.model.sharding import make_mesh
from mone_jax.pruning.planning import LayerPlan, Plan
from mone_jax.pruning.transform import prune

T = 12


@pytest.fixture(scope="module")
def tiny(hf_models, tmp_path_factory):
    """The tiny Qwen3-MoE (2 MoE layers of 8 experts, top-2), its statistics, validation blocks, files."""
    folder, _ = hf_models("qwen3_moe")
    rng = np.random.default_rng(4)
    calib, valid = rng.integers(0, 96, (8, T)).astype(np.int32), rng.integers(0, 96, (3, T)).astype(np.int32)
    model = load_hf(folder, progress=False)
    tmp = tmp_path_factory.mktemp("greedy")
    np.save(tmp / "calib.npy", calib)
    np.save(tmp / "valid.npy", valid)
    return folder, model, calibrate(model, [calib], progress=False), valid, tmp


def _replay_nll(model, stats, novices: dict[int, list[int]], valid) -> float:
    """Validation NLL of the substitution plan with ``novices``, pruned the ordinary way (compact experts)."""
    E = model.config.num_experts
    plan = Plan("mone", "model", None, {i: LayerPlan(tuple(e for e in range(E) if e not in nov), tuple(sorted(nov)))
                                         for i, nov in novices.items()})
    return perplexity(prune(model, stats, plan), valid, batch_size=8)["nll"]


@pytest.mark.slow
def test_every_step_is_the_best_single_replacement(tiny):
    folder, model, stats, valid, _ = tiny
    plan = greedy_plan(model, stats, {"v": valid}, metric="mone", keep=7, candidates=None, progress=False)
    search = plan.search
    assert len(search["steps"]) == 2 and search["evaluations"] == 1 + 16 + 15  # start, then every expert left
    assert model.moe_blocks()[0].novice_mask is None  # the model is left as it was
    novices = {i: [] for i in plan.layers}
    for step in search["steps"]:  # replayed with pruned models: each step is the argmin over every replacement
        losses = {(i, e): _replay_nll(model, stats, {**novices, i: novices[i] + [e]}, valid)
                  for i in novices for e in range(8) if e not in novices[i]}
        best = min(losses, key=losses.get)
        assert (step["layer"], step["expert"]) == best
        assert math.isclose(step["nll"], losses[best], rel_tol=1e-5, abs_tol=1e-6)
        novices[best[0]].append(best[1])
    assert {i: list(lp.novices) for i, lp in plan.layers.items()} == {i: sorted(n) for i, n in novices.items()}


def test_floor_candidates_and_equal_counts(tiny):
    _, model, stats, valid, _ = tiny
    evals = {"v": valid}
    free = greedy_plan(model, stats, evals, metric="frequency", keep=3, candidates=2, lazy=True, progress=False)
    kept = [len(lp.kept) for lp in free.layers.values()]
    assert sum(kept) == 6 and min(kept) >= 2  # (8 - 3) x 2 novices in all, top-k = 2 kept in each layer
    scores = {i: np.asarray(lp.scores) for i, lp in free.layers.items()}
    novices = {i: set() for i in free.layers}
    for step in free.search["steps"]:  # each choice among the two lowest-scored experts left in its layer
        i, e = step["layer"], step["expert"]
        left = [x for x in np.argsort(scores[i], kind="stable") if x not in novices[i]]
        assert e in left[:2]
        novices[i].add(e)
    # lazy: after the first step (4 candidates measured) far fewer than the pool per step
    assert free.search["evaluations"] < 1 + 4 + sum(s["candidates"] for s in free.search["steps"][1:])
    equal = greedy_plan(model, stats, evals, metric="frequency", keep=5, candidates=2, equal_counts=True,
                        progress=False)
    assert [len(lp.kept) for lp in equal.layers.values()] == [5, 5]
    assert equal.search["kept_per_layer"] == {"0": 5, "1": 5}
    assert parse_candidates("all") is None and parse_candidates("3") == 3
    for bad in ("0", "x", "-2"):
        with pytest.raises(UserError, match="--candidates"):
            parse_candidates(bad)


@pytest.mark.slow
def test_prune_scope_greedy_fit_weighted_export_matches_its_search(tiny):
    folder, model, _, valid, tmp = tiny
    out, plan_out, stats_out = tmp / "out", tmp / "plan.json", tmp / "stats.safetensors"
    assert main(["prune", str(folder), "--calib", str(tmp / "calib.npy"), "--metric", "mone", "--scope", "greedy",
                 "--candidates", "2", "--valid", str(tmp / "valid.npy"), "--valid-samples", "3", "--ratio", "0.5",
                 "--fit", "weighted", "--out", str(out), "--plan-out", str(plan_out), "--stats-out", str(stats_out),
                 "--quiet"]) == 0
    plan = json.loads(plan_out.read_text())
    assert plan["scope"] == "greedy" and sum(len(lp["kept"]) for lp in plan["layers"].values()) == 8
    assert json.loads((out / "mone_plan.json").read_text()) == plan
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    want = math.log(hf_perplexity(hf, valid, np.ones_like(valid)))  # the export, in transformers
    assert math.isclose(plan["search"]["validation_nll"], want, rel_tol=1e-4)
    assert math.isclose(plan["fit"]["validation_nll_after"], want, rel_tol=1e-4)
    # the novices exported are sum g^2 y / sum g^2 of the statistics, not their plain means; "before" is the means'
    stats, p = Stats.load(stats_out), Plan.from_dict(plan)
    for i, lp in p.layers.items():
        s = stats.layers[i]
        weighted = s.wsq_out_sum[list(lp.novices)] / s.wsq_sum[list(lp.novices)][:, None]
        np.testing.assert_allclose(s.novice_means(lp.novices, fit="weighted"), weighted, rtol=1e-6)
        assert not np.allclose(weighted, s.mean[list(lp.novices)], rtol=1e-3)
    before = perplexity(prune(model, stats, replace(p, fit=None)), valid)["nll"]
    assert math.isclose(plan["fit"]["validation_nll_before"], before, rel_tol=1e-5)
    card = (out / "README.md").read_text()
    assert "greedy" in card and str(plan["search"]["evaluations"]) in card and "--fit weighted" in card



def test_refusals(tiny, capsys):
    folder, _, _, _, tmp = tiny
    base = ["prune", str(folder), "--calib", str(tmp / "calib.npy"), "--valid", str(tmp / "valid.npy"), "--ratio",
            "0.5", "--out", str(tmp / "d"), "--quiet"]
    for extra, match in ((["--scope", "greedy", "--format", "drop"], "greedy judges experts replaced"),
                         (["--scope", "greedy", "--candidates", "0"], "--candidates takes"),
                         (["--scope", "greedy", "--semantics", "reference"], "exact semantics"),
                         (["--fit", "weighted", "--format", "drop"], "fits novices")):
        assert main([*base, *extra]) == 2
        assert match in capsys.readouterr().err
    assert not (tmp / "d").exists()
    assert main(["plan", "--stats", "s", "--scope", "greedy", "--ratio", "0.5", "--plan-out", str(tmp / "p")]) == 2
    assert "use `mone-jax prune --scope greedy`" in capsys.readouterr().err


@pytest.mark.slow
def test_greedy_and_kd_on_a_2x4_mesh_equal_one_device(tiny):
    """On 8 devices as a 2x4 (data, expert) mesh, rows split over all of them (3 validation rows and kd batches of
    6 padded to 8 with masked rows): the greedy plan is one device's and every step's loss equals one device's
    to float32 rounding. kd's fitted tensors equal one device's within 2e-5 while the fit moves them by up to
    1e-3 a step, and nothing else moves: Adam divides each gradient by its own RMS, so a near-zero one rounded differently by the
    devices' partial sums still moves its entry by a share of the learning rate."""
    folder, model, stats, valid, tmp = tiny
    mesh = make_mesh((2, 4))
    kw = dict(metric="frequency", keep=6, candidates=2, lazy=True, progress=False)
    one = greedy_plan(model, stats, {"v": valid}, **kw)
    spread_model = load_hf(folder, progress=False)  # laid out on the mesh in place
    got = greedy_plan(spread_model, stats, {"v": valid}, mesh=mesh, **kw)
    assert got.layers == one.layers
    np.testing.assert_allclose([s["nll"] for s in got.search["steps"]], [s["nll"] for s in one.search["steps"]],
                               rtol=1e-6)
    assert len(spread_model.layers[0].mlp.router[...].sharding.device_set) == 8
    calib, fitted, kept = np.load(tmp / "calib.npy"), [], []
    start = prune(model, stats, one)
    for teacher, on in ((model, None), (spread_model, mesh)):
        student = prune(teacher, stats, one)
        kept.append(distill(teacher, student, calib, valid, lr=1e-3, warmup=0, end_lr=1e-3, batch_size=6,
                            max_steps=3, eval_every=1, progress=False, mesh=on)["best_step"])
        state = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(student))}
        fitted.append({p: v for p, v in state.items() if fitted_path(student, p)})
    assert fitted[0].keys() == fitted[1].keys() and not any(p[-1] == "down" for p in fitted[0])
    base = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(start))}
    assert all(np.array_equal(v, base[p]) for p, v in state.items() if p not in fitted[1])  # the rest as pruned
    moved = max(np.abs(v - base[p]).max(initial=0) for p, v in fitted[0].items())
    assert kept[0] == kept[1] > 0 and moved > 5e-4  # Adam: up to lr (1e-3) a step
    for path, value in fitted[0].items():
        np.testing.assert_allclose(fitted[1][path], value, rtol=0, atol=2e-5, err_msg=str(path))
