"""Backends: each runs models through one engine interface, using the core scorer and budget policy."""

from __future__ import annotations

import importlib.util

from ..errors import UserError

BACKENDS = ("torch", "mlx", "llamacpp")
IMPLEMENTED = ("torch",)


def installed(name: str) -> bool:
    module = {"torch": "torch", "mlx": "mlx_lm", "llamacpp": "llama_cpp"}[name]
    return importlib.util.find_spec(module) is not None


def choose_backend(requested: str = "auto") -> tuple[str, str]:
    """(backend, why): the backend to use and the reason, for --backend and `triattn doctor`."""
    if requested != "auto":
        if requested not in BACKENDS:
            raise UserError(f"unknown backend {requested!r} (choose auto, {', '.join(BACKENDS)})")
        if requested not in IMPLEMENTED:
            raise UserError(f"the {requested} backend is not available yet in this version (use --backend torch)")
        if not installed(requested):
            raise UserError(f"the {requested} backend is not installed: pip install 'triattn-local[{requested}]'")
        return requested, "asked for with --backend"
    if installed("torch"):
        return "torch", "torch is installed (the only backend implemented so far)"
    raise UserError("no backend is installed: pip install 'triattn-local[torch]'")


def load_engine(model: str, backend: str = "auto", device: str = "auto", dtype: str = "auto"):
    """Load a model (alias or directory) with the chosen backend; heavy libraries are imported only here."""
    from ..registry import resolve_model

    name, _ = choose_backend(backend)
    path = resolve_model(model)
    if name == "torch":
        from .torch.engine import TorchEngine

        engine = TorchEngine(str(path), device=device, dtype=dtype)
        engine.model_id = model  # what the user called it: an alias or a path
        return engine
    raise UserError(f"backend {name} is not available")
