"""The README's Python snippet and quick start run as written (issue 14), on the shipped demo model; the quick
start's export loads as lm-evaluation-harness loads models."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
from conftest import one_device_env

from mone_jax.convert.writer import verify_export

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_python_snippet_runs_as_written(tmp_path):
    readme = (REPO / "README.md").read_text()
    snippet = next(s for s in re.findall(r"```python\n(.*?)```", readme, re.S) if "import mone_jax" in s)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=900)
    assert p.returncode == 0, p.stderr
    assert "'perplexity'" in p.stdout and verify_export(tmp_path / "pruned-py") == []
    import mone_jax

    public = dir(mone_jax)
    assert {"calibration_batches", "load_token_blocks", "perplexity", "load_hf", "calibrate"} <= set(public)
    assert not [n for n in public if n in ("importlib", "annotations", "TYPE_CHECKING")]


def test_extras_match_use():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    torch_pin = [r for r in extras["torch"] if r.startswith("torch")]
    assert torch_pin == ["torch==2.13.0"] and torch_pin[0] in extras["test"]


def _main_command_section(readme: str) -> str:
    return readme.split("## Main command", 1)[1].split("On your own model:", 1)[0]


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory) -> tuple[Path, list[str], list[subprocess.CompletedProcess]]:
    """The quick start's commands, run as a user runs them (a shell in an empty folder with only the installed
    tool, one CPU device): (the folder, the commands, their runs)."""
    cwd = tmp_path_factory.mktemp("quick_start")
    section = _main_command_section((REPO / "README.md").read_text())
    commands = [line for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()]
    env = one_device_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    runs = [subprocess.run(c, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
            for c in commands]
    return cwd, commands, runs


@pytest.mark.slow
def test_quick_start_runs_as_written_with_the_phases_and_last_line_it_states(quick_start):
    """`mone-jax prune` with no arguments prints README's phases in README's order and ends with `done`; the
    held-out file README makes is enough for its `eval`; the export verifies and replaces 25% of 16 experts."""
    cwd, commands, runs = quick_start
    section = _main_command_section((REPO / "README.md").read_text())
    phases = re.findall(r"`(\w+)`", re.search(r"The phases, in\s+order: (.*?);", section, re.S)[1])
    assert commands[0] == "mone-jax prune" and len(commands) >= 3
    assert [r.returncode for r in runs] == [0] * len(commands), [r.stderr[-1500:] for r in runs]
    lines = [ln for ln in runs[0].stderr.splitlines() if ln.startswith("mone-jax: [")]
    seen = [ln.split("] ", 1)[1].split(":", 1)[0] for ln in lines]
    assert [p for i, p in enumerate(seen) if i == 0 or p != seen[i - 1]] == phases
    last = runs[0].stderr.splitlines()[-1]
    assert last == lines[-1] and "] done: " in last
    out = cwd / "mone-demo-out"
    assert "perplexity" in runs[-1].stdout and verify_export(out) == []
    cfg = json.loads((out / "config.json").read_text())
    targets = cfg["compression_config"]["transform_config"]["expert_substitution"]["targets"]
    assert len(targets) == cfg["num_hidden_layers"]
    assert all(len(t["replacements"]) == 4 for t in targets.values())  # 25% of 16 experts


@pytest.mark.slow
def test_quick_start_export_loads_as_lm_eval_loads_it_and_its_eval_is_transformers(quick_start):
    """The pruned demo loads as lm-evaluation-harness's `hf` model does (config, model, tokenizer, generate), and
    the quick start's `eval` line states transformers' mean NLL over the same blocks (float64 log-softmax)."""
    torch, transformers = pytest.importorskip("torch"), pytest.importorskip("transformers")
    from mone_jax.app.data import load_token_blocks
    from mone_jax.evaluate.perplexity import predicted

    cwd, commands, runs = quick_start
    out = cwd / "mone-demo-out"
    config = transformers.AutoConfig.from_pretrained(out, trust_remote_code=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype="auto").eval()
    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert tok.eos_token_id == config.eos_token_id and tok.pad_token_id is not None
    enc = tok(["In the beginning"], return_tensors="pt")
    with torch.no_grad():
        gen = hf.generate(**enc, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape == (1, enc["input_ids"].shape[1] + 6) and isinstance(tok.decode(gen[0]), str)

    args = commands[-1].split()
    assert args[:3] == ["mone-jax", "eval", "mone-demo-out"] and runs[-1].returncode == 0
    opt = dict(zip(args[3::2], args[4::2]))
    ids = load_token_blocks(str(cwd / opt["--data"]), tokenizer_dir=out, num_samples=int(opt["--num-samples"]),
                            seq_len=int(opt["--seq-len"]), contiguous=True)  # eval's blocks without --seed
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.as_tensor(ids)).logits.double()[:, :-1], -1)
    nll = -logp.gather(-1, torch.as_tensor(ids[:, 1:, None], dtype=torch.long))[..., 0].numpy()
    said = re.fullmatch(r"perplexity [\d.]+ \(mean NLL ([\d.]+)\) over (\d+) tokens\n", runs[-1].stdout)
    assert said, runs[-1].stdout
    assert int(said[2]) == int(predicted(np.ones(ids.shape)).sum())
    assert abs(float(said[1]) - nll.mean()) < 1e-4  # printed to 5 decimals
