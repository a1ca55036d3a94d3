"""A new user's first hour (issue 14): every sample calibrated, parseable and honest output, global options,
clean finished runs, self-describing exports. Runs the real CLI in-process (``mone_jax.app.cli.main``) on the tiny
checkpoints of conftest.py, against independent references (a float64 NumPy loop, the plan file itself)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from checks import assert_stats_match
from reference import reference_stats

import mone_jax
from mone_jax.app.cli import main
from mone_jax.base.stats import Stats
from mone_jax.convert.writer import verify_export


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def ids10(tmp_path) -> Path:
    """10 sequences: with --batch-size 4 the last batch holds 2."""
    path = tmp_path / "ids.npy"
    np.save(path, np.random.default_rng(3).integers(0, 96, (10, 12)).astype(np.int32))
    return path


def test_short_last_batch_is_calibrated_not_dropped(hf_models, ids10, tmp_path, capsys):
    folder, hf = hf_models("olmoe", "a")
    rc, out, err = cli(capsys, "calibrate", folder, "--calib", ids10, "--batch-size", 4, "--stats-out",
                     tmp_path / "s.safetensors", "--quiet")
    assert rc == 0
    ref, tokens = reference_stats(hf, [(np.load(ids10), None)])  # all 10 samples, float64
    assert_stats_match(Stats.load(tmp_path / "s.safetensors"), ref, tokens, reference=False)  # an exact-semantics file
    assert f"calibrated on {tokens} tokens (10 sequences x 12 tokens" in out  # the .npy shape used
    assert "mone-jax: [" not in err  # --quiet: no phase lines


def test_prune_output_is_json_honest_and_self_describing(hf_models, ids10, tmp_path, capsys, monkeypatch):
    import mone_jax.convert.load as load

    folder, _ = hf_models("qwen3_moe", "a")  # 8 experts, 2 MoE layers
    before_load = []
    real_load = load.load_hf

    def load_hf(*a, **kw):  # the real loader, noting what the user had seen when it started
        before_load.append(capsys.readouterr().err)
        return real_load(*a, **kw)

    monkeypatch.setattr(load, "load_hf", load_hf)
    rc, out, err = cli(capsys, "prune", folder, "--calib", ids10, "--ratio", 0.4, "--scope", "model", "--out",
                       tmp_path / "out", "--plan-out", tmp_path / "p.json", "--stats-out", tmp_path / "s.safetensors")
    assert rc == 0
    # phase feedback (6): one line per phase on a non-terminal, the first before the model loads, no bar redraws
    err = before_load[0] + err
    phases = [line.split("] ")[1].split(":")[0] for line in err.splitlines() if line.startswith("mone-jax: [")]
    assert phases == ["check", "data", "load", "compile", "calibrate", "plan", "export", "done"]
    assert before_load[0].startswith("mone-jax: [") and "\r" not in err
    summary = json.loads(out)  # nothing but JSON on stdout
    plan = json.loads((tmp_path / "p.json").read_text())
    kept = {k: len(v["kept"]) for k, v in plan["layers"].items()}
    assert summary["plan"]["kept_per_layer"] == kept
    achieved = 1 - sum(kept.values()) / (8 * len(kept))
    assert summary["plan"]["pruned_fraction"] == pytest.approx(achieved)
    assert achieved != pytest.approx(0.4)  # 0.4 of 8 experts is not a whole number
    assert f"{achieved:.1%} pruned" in err and "40.0% requested" in err and str(tmp_path / "out") in err
    # the folder says how it was made (11), inspect reads it back (12), without warning about our own code (7)
    out_dir = tmp_path / "out"
    front = yaml.safe_load((out_dir / "README.md").read_text().split("---")[1])["mone_jax"]
    assert front["kept_per_layer"] == kept and front["format"] == "substitution" and front["metric"] == "mone"
    assert front["version"] == mone_jax.__version__ and front["source_model"] == str(folder)
    assert front["calibration"]["tokens"] == Stats.load(tmp_path / "s.safetensors").tokens == 120
    # the matmul precision (--precision, default highest for float32): statistics, plan and card say it
    assert front["calibration"]["precision"] == plan["precision"] == "highest"
    assert Stats.load(tmp_path / "s.safetensors").meta["precision"] == "highest"
    assert json.loads((out_dir / "mone_plan.json").read_text()) == plan
    assert verify_export(out_dir) == []
    rc, out, err = cli(capsys, "inspect", out_dir, "--json")
    pruned = json.loads(out)["pruned_layers"]
    assert rc == 0 and json.loads(out)["format"] == "substitution" and "warning" not in err
    assert pruned == {k: {"kept": v["kept"], "novices": v["novices"]} for k, v in plan["layers"].items()}
    # `plan --scope model` states the per-layer counts, not one number for all layers
    rc, out, _ = cli(capsys, "plan", tmp_path / "s.safetensors", "--ratio", 0.4, "--scope", "model", "--plan-out",
                     tmp_path / "q.json")
    counts = [len(v["kept"]) for v in json.loads((tmp_path / "q.json").read_text())["layers"].values()]
    assert rc == 0 and "/".join(map(str, counts)) in out and "40.0% requested" in out


def test_version_and_global_options_after_the_command(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mone-jax {mone_jax.__version__}"
    missing = ["plan", tmp_path / "missing.safetensors", "--keep", 1, "--plan-out", tmp_path / "p.json"]
    assert cli(capsys, *missing, "--quiet")[0] == 2
    with pytest.raises(mone_jax.UserError):  # --debug after the command: the traceback, not the one line
        main([str(a) for a in [*missing, "--debug"]])
    with pytest.raises(mone_jax.UserError):
        main(["--debug", *map(str, missing)])


def test_finished_sequential_run_leaves_no_checkpoint_and_equal_bytes(hf_models, ids10, tmp_path, capsys):
    folder, _ = hf_models("olmoe", "a")
    files = []
    for k in range(2):
        files.append(tmp_path / f"s{k}.safetensors")
        rc, _, err = cli(capsys, "calibrate", folder, "--calib", ids10, "--batch-size", 4, "--stats-out", files[-1],
                         "--sequential", "--checkpoint-dir", tmp_path / "ck", "--checkpoint-every", 1, "--quiet")
        assert rc == 0 and "resuming" not in err
        assert not (tmp_path / "ck").exists()
    assert files[0].read_bytes() == files[1].read_bytes()
    stats = Stats.load(files[0])
    for k in range(4):  # safetensors writes metadata in hash order: our files must not
        stats.save(tmp_path / f"again{k}.safetensors")
        assert (tmp_path / f"again{k}.safetensors").read_bytes() == files[0].read_bytes()


def test_bad_inputs_refused_before_slow_work(hf_models, tmp_path, capsys):
    """A folder with config.json but no weights or tokenizer: each refusal must come from the bad input, which
    is checked before the model loads or any text is tokenized."""
    folder, _ = hf_models("olmoe", "a")  # max_position_embeddings 256
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((folder / "config.json").read_text())
    text = tmp_path / "t.txt"
    text.write_text("some words to calibrate on\n\nand another paragraph\n")
    rc, _, err = cli(capsys, "forward", bare, "--tokens", tmp_path / "missing.npy", "--out", tmp_path / "l.npy")
    assert rc == 2 and "missing.npy" in err
    rc, _, err = cli(capsys, "eval", bare, "--data", text, "--seq-len", 4096)
    assert rc == 2 and "--seq-len 4096 exceeds" in err
    rc, _, err = cli(capsys, "prune", folder, "--calib", text, "--seq-len", 4096, "--keep", 4, "--out", tmp_path / "o")
    assert rc == 2 and "4096 exceeds" in err  # not the missing tokenizer: nothing was tokenized
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"body": "hello"}) + "\n")
    rc, _, err = cli(capsys, "eval", "mone_jax/demo/model", "--data", rows, "--seq-len", 8)
    assert rc == 2 and "no field 'text' (fields: body)" in err and "--text-field" in err


def test_verify_lists_every_problem(tmp_path, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    files = {name: folder / name for name in ("a.json", "b.json", "c.json")}
    for path in files.values():
        path.write_text("{}")
    manifest = {name: {"sha256": hashlib.sha256(b"{}").hexdigest(), "size": 2} for name in files}
    (folder / "mone_manifest.json").write_text(json.dumps({"format_version": 1, "files": manifest}))
    assert cli(capsys, "verify", folder)[0] == 0
    files["a.json"].unlink()
    files["b.json"].write_text("[]")
    (folder / "extra.txt").write_text("?")
    rc, _, err = cli(capsys, "verify", folder)
    assert rc == 2 and err.count("\n") == 4 and "3 problems" in err
    assert "missing file 'a.json'" in err and "'b.json' changed" in err and "unexpected file 'extra.txt'" in err


def test_help_states_every_option_its_choices_and_defaults(capsys):
    from mone_jax.app.arguments import build_parser
    from mone_jax.convert.formats import FORMATS
    from mone_jax.pruning.scoring import METRICS

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, p in commands.items():
        for action in p._actions:
            assert action.help, f"`{name} {'/'.join(action.option_strings) or action.dest}` has no help text"
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert all(m in text for m in METRICS) and all(f in text for f in FORMATS)
    assert "(default: mone)" in text and "(default: layer)" in text and "(default: substitution)" in text
    assert "--calib self --num-samples 16 --seq-len 64 --ratio 0.25" in text


@pytest.mark.slow
def test_no_noise_on_local_text_pruned_tokenizers_and_an_unreachable_hub(tmp_path, capfd):
    from mone_jax.app.data import load_token_blocks

    demo = Path(mone_jax.__file__).parent / "demo" / "model"
    pruned = tmp_path / "pruned"  # a modepd-style config: a model type transformers does not know, and auto_map
    pruned.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (pruned / name).write_bytes((demo / name).read_bytes())
    cfg = json.loads((demo / "config.json").read_text())
    (pruned / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3_moe_compressed", "auto_map": {
        "AutoConfig": "modeling_mone.Qwen3MoeCompressedConfig"}}))
    text = tmp_path / "t.txt"
    text.write_text("In the beginning was a word.\n\nAnd then there were many more words to read here.\n")
    capfd.readouterr()
    ids = load_token_blocks(str(text), tokenizer_dir=pruned, num_samples=1, seq_len=8, vocab_size=cfg["vocab_size"],
                            contiguous=True)
    out, err = capfd.readouterr()
    assert ids.shape == (1, 8) and out == "" and err == ""  # no split bar, no model-type warning, no prompt
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there
    p = subprocess.run([sys.executable, "-m", "mone_jax.app.cli", "eval", str(demo), "--data", "hf:some/data", "--seq-len", "8"],
                       capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in p.stderr.splitlines() if not line.startswith("mone-jax: [")]  # all but phase lines
    assert p.returncode == 2 and lines == [lines[0]] and "cannot be reached" in lines[0]


def test_one_vocabulary(hf_models, ids10, tmp_path, capsys):
    folder, hf = hf_models("olmoe", "a")
    ids = np.load(ids10)[:2]
    np.save(tmp_path / "two.npy", ids)
    for flag in ("--logits-out", "--out"):  # the file option's name, and its former name
        assert cli(capsys, "forward", folder, "--tokens", tmp_path / "two.npy", flag, tmp_path / f"{flag}.npy")[0] == 0
    assert np.array_equal(np.load(tmp_path / "--logits-out.npy"), np.load(tmp_path / "--out.npy"))
    model = mone_jax.load_hf(folder, progress=False)
    stats = mone_jax.calibrate(model, [ids], progress=False)
    stats.save(tmp_path / "s.safetensors")
    assert cli(capsys, "plan", "--stats", tmp_path / "s.safetensors", "--keep", 5, "--plan-out", tmp_path / "p.json",
               "--quiet")[0] == 0
    plan = mone_jax.load_plan(tmp_path / "p.json")
    pruned = mone_jax.prune(model, stats, plan, mode="substitution")  # the format's word
    assert np.array_equal(np.asarray(pruned(ids)), np.asarray(mone_jax.prune(model, stats, plan, mode="substitute")(ids)))
    for call in (lambda: mone_jax.plan(stats, keep=99), lambda: mone_jax.plan(stats, ratio=1.5),
                 lambda: mone_jax.plan(stats, keep=3, ratio=0.5), lambda: mone_jax.prune(model, stats, plan, mode="x")):
        with pytest.raises(mone_jax.UserError) as e:
            call()
        assert "--" not in str(e.value)  # Python errors do not name command-line options


def test_self_calibration_says_what_it_risks(hf_models, tmp_path, capsys):
    folder, _ = hf_models("olmoe", "a")
    rc, _, err = cli(capsys, "calibrate", folder, "--calib", "self", "--num-samples", 2, "--seq-len", 8,
                     "--stats-out", tmp_path / "s.safetensors")  # warnings: not under --quiet
    warning = [line for line in err.splitlines() if line.startswith("mone-jax: warning: calibrating on the model's own")]
    assert rc == 0 and len(warning) == 1 and "balanced mix" in warning[0] and "mone-jax compare" in warning[0]
    assert Stats.load(tmp_path / "s.safetensors").tokens == 16


def test_perplexity_figure_is_readable(tmp_path):
    from mone_jax.evaluate.report import plot

    repo = Path(__file__).resolve().parents[1]
    res = json.loads((repo / "docs" / "results.json").read_text())["0"]["compare"]  # calibration seed 0
    fig = plot(res, tmp_path / "ppl.png")
    assert (tmp_path / "ppl.png").stat().st_size > 0
    assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in fig.axes)  # one legend
    ax = fig.axes[0]
    assert "log" in ax.get_ylabel() and ax.get_yscale() == "log" and len(ax.get_yticks()) >= 4
    metrics = list(dict.fromkeys(p["metric"] for p in res["plans"]))
    looks = [(line.get_linestyle(), line.get_marker()) for line in ax.get_lines()]
    assert len(looks) == len(metrics) and len(set(zip(looks, [line.get_color() for line in ax.get_lines()]))) == len(looks)
    src = next(iter(res["sources"]))
    seeds = [p["perplexity"][src] for p in res["plans"] if p["metric"] == "random" and p["mode"] == "substitute"]
    band = ax.collections[0].get_paths()[0].vertices[:, 1]  # random's min-max over its seeds
    assert np.isclose(band.max(), max(seeds))


def test_auto_choice_batch_size_and_mesh_are_shown(hf_models, ids10, tmp_path, capsys, monkeypatch):
    import jax

    folder, _ = hf_models("qwen3_moe", "a")
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(capsys, "prune", folder, "--calib", ids10, "--metric", "auto", "--valid-fraction", 0.25,
                       "--ratio", 0.5, "--out", "out")
    assert rc == 0, err
    summary = json.loads(out)
    plan = json.loads((tmp_path / "out" / "mone_plan.json").read_text())
    chosen = plan["selection"]["chosen"]
    sel = summary["metric_selection"]
    assert sel["chosen"] == chosen and set(sel["validation_nll"]) == set(plan["selection"]["candidates"])
    assert summary["batch_size"] >= 1 and summary["batch_size_from"] == "auto"
    assert summary["mesh"] == f"data={jax.device_count()},expert=1"  # CPU: data parallel
    assert f"chose metric '{chosen}'" in err and all(m in err for m in sel["validation_nll"])
    assert f"batch size {summary['batch_size']} (chosen for this machine)" in err and f"{summary['mesh']} mesh" in err
    card = (tmp_path / "out" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])["mone_jax"]
    assert meta["source_model"] == str(Path(folder).resolve()) and Path(meta["source_model"]).is_absolute()
    assert meta["metric_selection"]["chosen"] == chosen and "`--metric auto`" in card
    assert "pip install torch" in card


def test_quiet_is_errors_only_and_small_messages(hf_models, ids10, tmp_path, capsys):
    folder, _ = hf_models("qwen3_moe", "a")
    rc, out, err = cli(capsys, "prune", folder, "--calib", "self", "--num-samples", 2, "--seq-len", 8, "--ratio",
                       0.5, "--out", tmp_path / "q", "--quiet")
    assert rc == 0 and err == "" and json.loads(out)["batch_size"] >= 1  # no warning, no summary; the JSON stays
    rc, out, err = cli(capsys, "prune", folder, "--calib", ids10, "--metric", "nope", "--out", tmp_path / "r",
                       "--quiet")
    assert rc == 2 and err.count("\n") == 1 and "unknown metric 'nope'" in err and "auto" in err
    rc, _, err = cli(capsys, "calibrate", folder, "--calib", ids10, "--num-samples", 2, "--seq-len", 20,
                     "--stats-out", tmp_path / "s.st")
    assert rc == 2 and "--seq-len" in err, err
    rc, _, err = cli(capsys, "calibrate", folder, "--calib", ids10, "--batch-size", 16, "--stats-out",
                     tmp_path / "s.st")
    assert rc == 0 and "1 batch of" in err and "1 batches" not in err


def test_prune_names_every_argument_problem_at_once_the_folder_first(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where an output would land
    rc, out, err = cli(capsys, "prune", tmp_path / "no_such_model", "--quiet")
    assert rc == 2 and out == "" and err.count("\n") == 1 and not any(tmp_path.iterdir())
    assert err.startswith(f"mone-jax: error: 4 problems: model folder '{tmp_path / 'no_such_model'}' does not exist")
    said = [err.index(option) for option in ("--keep N", "--calib", "--out")]
    assert said == sorted(said)


@pytest.mark.slow
def test_time_stamps_count_from_process_start(tmp_path):
    """The first phase line's stamp is the time since launch as the parent measures it (imports included)."""
    import time

    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "mone_jax.app.cli", "prune", str(tmp_path / "nowhere")],
                         stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    first = p.stderr.readline()
    seen = time.monotonic() - t0
    p.communicate(timeout=120)
    stamp = float(first.split("[")[1].split("s]")[0])
    assert first.startswith("mone-jax: [") and seen - 0.5 < stamp <= seen + 0.05, (first, seen)
