"""The embedded demo models: tiny Nemotron-H hybrids (mlx-lm `nemotron_h`) trained here on the offline corpus.

`model_path("demo")` is the dense hybrid (Mamba2 + attention + MLP layers), `model_path("demo-moe")` the
MoE hybrid (Mamba2 + attention + routed-expert layers). Both are ordinary mlx-lm model dirs; see TRAINING.md.
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
MODEL_DIRS = {"demo": "demo", "demo-moe": "demo_moe"}


def model_names() -> list[str]:
    return list(MODEL_DIRS)


def model_path(name: str = "demo") -> Path:
    """The directory of a shipped demo model ("demo" or "demo-moe"; "demo_moe" is accepted too)."""
    key = name.replace("_", "-")
    if key not in MODEL_DIRS:
        raise KeyError(f"unknown demo model {name!r}; choose one of {', '.join(MODEL_DIRS)}")
    return MODELS_DIR / MODEL_DIRS[key]
