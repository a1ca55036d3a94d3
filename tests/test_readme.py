"""The README's Python snippet runs as written (issue 14), on the shipped demo model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

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


@pytest.mark.slow
def test_quick_start_runs_as_written_with_the_phases_and_last_line_it_states(tmp_path):
    """The quick start's commands, run as a user runs them (a shell in an empty folder with only the
    installed tool): `mone-jax prune` prints README's phases in README's order and ends with `done`; the held-out
    file README makes is enough for its `eval`."""
    section = _main_command_section((REPO / "README.md").read_text())
    phases = re.findall(r"`(\w+)`", re.search(r"The phases, in\s+order: (.*?);", section, re.S)[1])
    commands = [line for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()]
    assert commands[0] == "mone-jax prune" and len(commands) >= 3
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    runs = [subprocess.run(c, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
            for c in commands]
    assert [r.returncode for r in runs] == [0] * len(commands), [r.stderr[-1500:] for r in runs]
    lines = [ln for ln in runs[0].stderr.splitlines() if ln.startswith("mone-jax: [")]
    seen = [ln.split("] ", 1)[1].split(":", 1)[0] for ln in lines]
    assert [p for i, p in enumerate(seen) if i == 0 or p != seen[i - 1]] == phases
    last = runs[0].stderr.splitlines()[-1]
    assert last == lines[-1] and "] done: " in last
    assert "perplexity" in runs[-1].stdout and verify_export(tmp_path / "mone-demo-out") == []
