"""The small MoE model shipped with mone-jax (trained by ``scripts/train_demo.py``; see model/README.md)."""

from __future__ import annotations

from pathlib import Path

from mone_jax.base.errors import UserError


def demo_model_dir() -> Path:
    """The demo model's Hugging Face folder inside the installed package."""
    folder = Path(__file__).resolve().parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise UserError(f"the demo model is missing from {folder}: reinstall mone-jax or pass a model folder")
    return folder
