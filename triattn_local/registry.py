"""Model names a user can type: aliases shipped with the package, else a local model directory."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO = "demo"


def demo_model_dir() -> Path:
    return Path(str(resources.files("triattn_local") / "demo" / "model"))


ALIASES = {DEMO: demo_model_dir}


def resolve_model(name: str) -> Path:
    """The directory of a model name: an alias (`demo`) or a path."""
    if name in ALIASES:
        return ALIASES[name]()
    return Path(name)
