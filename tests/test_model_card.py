"""The demo model card's perplexity is reproduced by the `mone-jax eval` command the card names."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import one_device_env

from mone_jax.demo import demo_model_dir

REPO = Path(__file__).resolve().parents[1]
CARD = demo_model_dir() / "README.md"


@pytest.mark.slow
def test_card_command_prints_the_card_perplexity():
    text = CARD.read_text()
    (claimed,) = re.findall(r"perplexity \*\*([0-9.]+)\*\*", text)
    (command,) = re.findall(r"^mone-jax eval .*$", text, flags=re.M)
    args = shlex.split(command)[1:]
    data = args[args.index("--data") + 1]
    if not (REPO / data).is_file():
        pytest.skip(f"shared corpus absent: {data} exists only in the project workspace")
    # as a user runs it: one device, XLA's default optimisation (65k tokens run 2x faster than at the suite's -O0)
    run = subprocess.run([sys.executable, "-m", "mone_jax.app.cli", *args, "--quiet"], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env=one_device_env(XLA_FLAGS=""))
    assert run.returncode == 0, run.stderr[-2000:]
    printed = float(re.search(r"perplexity ([0-9.]+)", run.stdout).group(1))
    assert f"{printed:.2f}" == claimed
