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
