"""``mone-jax compare`` against ``mone-jax eval`` on each plan's export, its compile count; ``--metric auto``
against an independent evaluation of every candidate; the carved validation split shares no token."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from checks import hf_perplexity
from conftest import torch, transformers

from mone_jax.app.cli import main
from mone_jax.app.compare_job import carve, parse_sources
from mone_jax.app.data import load_token_blocks
from mone_jax.base.errors import UserError
from mone_jax.calib.calibration import calibrate
from mone_jax.convert.criteria import plan_for
from mone_jax.convert.load import load_hf
from mone_jax.evaluate.perplexity import _nll_sum, perplexity
from mone_jax.pruning.planning import LayerPlan, Plan
from mone_jax.pruning.scoring import METRICS
from mone_jax.pruning.transform import prune

T = 13  # a block length no other test compiles, so the compile count below is this test's own


@pytest.fixture(scope="module")
def tiny(hf_models, tmp_path_factory):
    """The tiny Qwen3-MoE (8 experts, top-2), calibration ids [8, T] and two validation sources [2, T]."""
    folder, hf = hf_models("qwen3_moe")
    tmp = tmp_path_factory.mktemp("compare")
    rng = np.random.default_rng(1)
    files = {}
    for name, rows in (("calib", 8), ("a", 2), ("b", 2)):
        files[name] = tmp / f"{name}.npy"
        np.save(files[name], rng.integers(0, 96, (rows, T)).astype(np.int32))
    return folder, hf, files, tmp


@pytest.mark.slow
def test_compare_equals_eval_of_each_export_and_compiles_once_per_shape(tiny, capsys):
    folder, _, files, tmp = tiny
    out = tmp / "cmp"
    capsys.readouterr()
    assert main(["compare", str(folder), "--calib", str(files["calib"]), "--valid",
                 f"a={files['a']},b={files['b']}", "--metrics", "mone,random", "--seeds", "0,1", "--ratios", "0.5",
                 "--out", str(out)]) == 0
    res = json.loads((out / "compare.json").read_text())
    plans = res["plans"]
    assert len(plans) == 2 * (1 + 2)  # modes x (mone, random over 2 seeds)
    shapes = {(p["mode"], p["keep"]) for p in plans}
    assert len(shapes) == 2 and res["compiles"] == len(shapes) + 1  # + the original model's
    # stderr, not a terminal: a compile line per program jax compiled, one progress line per plan (+ the original)
    err = capsys.readouterr().err
    assert err.count("compile: the evaluation step") == res["compiles"]
    steps = progress_lines(err, "compare", "plans")
    assert [n for n, _, _ in steps] == list(range(1, len(plans) + 2)) and {t for _, t, _ in steps} == {len(plans) + 1}
    for (_, _, nll), p in zip(steps, [{"nll": {k: v["nll"] for k, v in res["original"].items()}}, *plans]):
        assert nll == pytest.approx(p["nll"]["all"], abs=1e-4)
    assert res["calib_tokens"] == 8 * T and res["timing"]["ratio"] > 0
    # a sample of plans, each exported by the streamed pruner and evaluated by `mone-jax eval`
    assert main(["calibrate", str(folder), "--calib", str(files["calib"]), "--stats-out", str(tmp / "s.st"),
                 "--quiet"]) == 0
    for p in (plans[0], plans[-1]):  # substitute mone, drop random seed 1
        E = res["num_experts"]
        layers = {i: {"kept": k, "novices": sorted(set(range(E)) - set(k))} for i, k in p["kept"].items()}
        (tmp / "plan.json").write_text(json.dumps({"layers": layers}))
        fmt = "drop" if p["mode"] == "drop" else "substitution"
        export = tmp / f"x-{p['mode']}-{p['ratio']}-{p['metric']}-{p['seed']}"
        assert main(["prune", str(folder), "--stats", str(tmp / "s.st"), "--plan", str(tmp / "plan.json"),
                     "--format", fmt, "--out", str(export), "--quiet"]) == 0
        for src in ("a", "b"):
            assert main(["eval", str(export), "--data", str(files[src]), "--num-samples", "2", "--seq-len", str(T),
                         "--result-out", str(tmp / "e.json"), "--quiet"]) == 0
            want = json.loads((tmp / "e.json").read_text())["perplexity"]
            assert math.isclose(p["perplexity"][src], want, rel_tol=1e-4), (p["metric"], src)
        nll = {s: math.log(p["perplexity"][s]) for s in ("a", "b")}
        assert math.isclose(math.log(p["perplexity"]["all"]), (nll["a"] + nll["b"]) / 2, rel_tol=1e-9)
    table = (out / "compare.md").read_text()
    assert all(f"| {m}" in table for m in ("mone", "random (2 seeds)"))
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_auto_picks_the_lowest_validation_loss_of_every_candidate(tiny, tmp_path, capsys):
    folder, _, files, _ = tiny
    out, plan_out = tmp_path / "auto", tmp_path / "plan.json"
    capsys.readouterr()
    programs = _nll_sum._cache_size()
    assert main(["prune", str(folder), "--calib", str(files["calib"]), "--metric", "auto", "--valid-fraction", "0.25",
                 "--ratio", "0.5", "--out", str(out), "--plan-out", str(plan_out)]) == 0
    plan = json.loads(plan_out.read_text())
    sel = plan["selection"]
    assert sorted(sel["candidates"]) == sorted(METRICS)
    losses = {m: c["nll"] for m, c in sel["candidates"].items()}
    assert plan["metric"] == sel["chosen"] == min(losses, key=losses.get)
    # progress on a non-terminal: one line per candidate, with its loss; a compile line only for what compiled
    err = capsys.readouterr().err
    assert err.count("compile: the evaluation step") == _nll_sum._cache_size() - programs
    steps = progress_lines(err, "auto", "candidate metrics")
    assert [(n, t) for n, t, _ in steps] == [(i + 1, len(METRICS)) for i in range(len(METRICS))]
    assert [nll for _, _, nll in steps] == pytest.approx([losses[m] for m in METRICS], abs=1e-4)
    assert json.loads((out / "mone_plan.json").read_text()) == plan  # the export keeps the record
    assert main(["verify", str(out)]) == 0
    # independent: statistics of the blocks not held out, each candidate pruned and evaluated on the held-out ones
    ids = np.load(files["calib"])
    held = sel["held_out"]["blocks"]
    assert len(held) == 2
    rest = np.delete(ids, held, axis=0)
    model = load_hf(folder, progress=False)
    stats = calibrate(model, [rest], progress=False)
    for m, loss in losses.items():  # weights-only metrics (aimer) scored from the checkpoint by the HF layer
        pruned = prune(model, stats, plan_for(m, stats=stats, model=folder, keep=plan["keep"], progress=False))
        assert math.isclose(perplexity(pruned, ids[held])["nll"], loss, rel_tol=1e-6), m
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    want = hf_perplexity(hf, ids[held], np.ones_like(ids[held]))
    assert math.isclose(want, sel["candidates"][sel["chosen"]]["perplexity"], rel_tol=1e-4)
    # `plan --metric auto` on the same statistics and validation blocks makes the same choice
    np.save(tmp_path / "held.npy", ids[held])
    stats.save(tmp_path / "s.st")
    assert main(["plan", str(folder), "--stats", str(tmp_path / "s.st"), "--metric", "auto", "--valid",
                 str(tmp_path / "held.npy"), "--valid-samples", "2", "--seq-len", str(T), "--ratio", "0.5",
                 "--plan-out", str(tmp_path / "p2.json"), "--quiet"]) == 0
    again = json.loads((tmp_path / "p2.json").read_text())
    assert {i: lp["kept"] for i, lp in again["layers"].items()} == {i: lp["kept"] for i, lp in plan["layers"].items()}
    for m, c in again["selection"]["candidates"].items():
        assert math.isclose(c["nll"], losses[m], rel_tol=1e-5), m


def progress_lines(err: str, name: str, unit: str) -> list[tuple[int, int, float]]:
    """(done, total, NLL) of each progress line ``name: done/total unit (..., NLL x)[, ETA ...]`` on stderr."""
    pattern = re.compile(rf"\] {name}: (\d+)/(\d+) {unit} \(.*NLL ([\d.]+)\)(, ETA \d.*)?$")
    found = [pattern.search(line) for line in err.splitlines()]
    return [(int(m[1]), int(m[2]), float(m[3])) for m in found if m]


def test_carved_validation_shares_no_token_with_calibration(tmp_path):
    stream = np.arange(5000)  # every position its own token id
    np.save(tmp_path / "s.npy", stream)
    blocks = load_token_blocks(str(tmp_path / "s.npy"), num_samples=20, seq_len=16, seed=3)
    batches = tuple(blocks[i:i + 8] for i in range(0, 20, 8))
    calib, valid, held = carve(batches, 0.25, seed=0, batch_size=8)
    kept = np.concatenate(calib)
    assert len(held) == valid.shape[0] == 5 and kept.shape[0] == 15
    assert not set(kept.ravel().tolist()) & set(valid.ravel().tolist())
    assert sorted(np.concatenate([kept, valid]).ravel().tolist()) == sorted(blocks.ravel().tolist())
    with pytest.raises(UserError, match="valid-fraction"):
        carve(batches, 1.0, 0, 8)


def test_bad_options(tiny, capsys):
    assert parse_sources("x.txt") == {"valid": "x.txt"}
    assert parse_sources("py=a.txt,bible=hf:x:y") == {"py": "a.txt", "bible": "hf:x:y"}
    for bad in ("a=x.txt,y.txt", "a=x,a=y", "all=x,b=y", "a=self,b=x"):
        with pytest.raises(UserError):
            parse_sources(bad)
    folder, _, files, tmp = tiny
    base = ["compare", str(folder), "--calib", str(files["calib"]), "--valid", str(files["a"]), "--out", str(tmp / "z")]
    assert main([*base, "--metrics", "nope"]) == 2
    assert main([*base, "--ratios", "0.25,x"]) == 2
    assert main([*base, "--ratios", "0.9", "--modes", "drop"]) == 2  # keeps fewer than top-k
    assert main(["prune", str(folder), "--stats", "s", "--plan", "p", "--metric", "auto", "--out", str(tmp / "q")]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp / "z").exists()


@pytest.mark.slow
def test_compare_scopes_and_fits_each_row_equals_its_plan_evaluated_independently(tiny, tmp_path, capsys):
    folder, _, files, _ = tiny
    out = tmp_path / "cmp"
    capsys.readouterr()
    assert main(["compare", str(folder), "--calib", str(files["calib"]), "--valid", f"a={files['a']},b={files['b']}",
                 "--metrics", "mone", "--ratios", "0.5", "--modes", "substitution", "--scopes", "layer,greedy",
                 "--fits", "none,weighted", "--candidates", "2", "--out", str(out)]) == 0
    res = json.loads((out / "compare.json").read_text())
    rows = {(p["scope"], p["fit"]): p for p in res["plans"]}
    assert list(rows) == [("layer", "none"), ("layer", "weighted"), ("greedy", "none"), ("greedy", "weighted")]
    assert rows["greedy", "none"]["search"] == rows["greedy", "weighted"]["search"]  # one search for both fits
    assert rows["greedy", "none"]["search"]["candidates"] == 2 and all(p["seconds"] > 0 for p in rows.values())
    assert "4 candidates, 1 greedy search" in capsys.readouterr().err
    # independent: statistics, each row's kept experts pruned the ordinary way (its fit), evaluated per source
    model = load_hf(folder, progress=False)
    stats = calibrate(model, [np.load(files["calib"])], progress=False)
    E = res["num_experts"]
    for (_, fit), p in rows.items():
        plan = Plan("mone", "model", None, {int(i): LayerPlan(tuple(k), tuple(e for e in range(E) if e not in k))
                                             for i, k in p["kept"].items()}, fit=None if fit == "none" else {"method": fit})
        pruned = prune(model, stats, plan)
        for src in ("a", "b"):
            assert math.isclose(perplexity(pruned, np.load(files[src]))["nll"], p["nll"][src], rel_tol=1e-5)
    greedy_kept = [len(k) for k in rows["greedy", "none"]["kept"].values()]
    assert sum(greedy_kept) == 8 and min(greedy_kept) >= 2  # 50% of 2 x 8 experts, top-2 kept per layer
    table = (out / "compare.md").read_text()
    assert all(f"| mone {name} |" in table for name in ("layer", "layer + weighted", "greedy", "greedy + weighted"))
    assert "## Candidates" in table
    base = ["compare", str(folder), "--calib", str(files["calib"]), "--valid", str(files["a"]), "--out", str(tmp_path / "z")]
    for extra, match in ((["--scopes", "greedy"], "which drop removes"), (["--fits", "kd,x"], "unknown fit 'x'"),
                         (["--scopes", "everywhere"], "unknown scope")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1
    assert not (tmp_path / "z").exists()


@pytest.mark.slow
def test_auto_over_scopes_and_fits_exports_the_candidate_with_the_lowest_validation_loss(tiny, tmp_path, capsys):
    folder, _, files, _ = tiny
    out, plan_out = tmp_path / "auto", tmp_path / "plan.json"
    capsys.readouterr()
    assert main(["prune", str(folder), "--calib", str(files["calib"]), "--metric", "auto", "--scope", "layer,greedy",
                 "--fit", "none,weighted,kd", "--valid-fraction", "0.25", "--ratio", "0.5", "--out", str(out),
                 "--plan-out", str(plan_out)]) == 0
    captured = capsys.readouterr()
    plan = json.loads(plan_out.read_text())
    sel = plan["selection"]
    n = len(METRICS) + 1 + 2 * 2  # every metric at scope layer, greedy, two fits on the best of each scope
    assert f"{n} candidates: {len(METRICS)} metrics at scope layer, greedy (4 per layer, lazy), weighted on the " \
           "best of each scope, kd on the best of each scope" in captured.err
    tried = {t["candidate"]: t for t in sel["tried"]}
    assert len(tried) == n and all(t["seconds"] > 0 for t in tried.values())
    best = min(sel["tried"], key=lambda t: t["nll"])
    assert sel["chosen_candidate"] == best["candidate"] and (plan["scope"], (plan.get("fit") or {}).get("method")) \
        == (best["scope"], best["fit"])
    assert json.loads(captured.out)["metric_selection"]["tried"] == sel["tried"]
    assert best["candidate"] in (out / "README.md").read_text()  # the card names what won and what was tried
    # independent: the export, in transformers, on the held-out blocks, scores the winner's recorded loss
    ids = np.load(files["calib"])
    held = ids[sel["held_out"]["blocks"]]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert math.isclose(math.log(hf_perplexity(hf, held, np.ones_like(held))), best["nll"], rel_tol=1e-4)
    # the layer candidates are the metrics' plans, each scored like `--metric auto` alone scores them
    for m, c in sel["candidates"].items():
        assert math.isclose(tried[f"{m} layer"]["nll"], c["nll"], rel_tol=1e-9)
    assert main(["prune", str(folder), "--calib", str(files["calib"]), "--metric", "mone", "--scope", "layer,greedy",
                 "--ratio", "0.5", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "candidates of --metric auto" in capsys.readouterr().err
