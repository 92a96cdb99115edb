"""Bundled checkpoints, shipped as package data (see README: how each was trained)."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent
DEFAULT_NAME = "moving-digits-lstm"


def bundled_checkpoints() -> list[Path]:
    """Every bundled ``.safetensors`` file, sorted by name."""
    return sorted(WEIGHTS_DIR.glob("*.safetensors"))


def default_checkpoint() -> Path:
    """The bundled default model (CNN+LSTM on moving digits)."""
    return WEIGHTS_DIR / f"{DEFAULT_NAME}.safetensors"
