"""Backends: each runs models through one engine interface, using the core scorer and budget policy."""

from __future__ import annotations

import importlib.util

from ..errors import UserError

BACKENDS = ("torch", "mlx", "llamacpp")
IMPLEMENTED = ("torch", "mlx", "llamacpp")


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
    if apple_silicon() and installed("mlx"):
        return "mlx", "Apple Silicon with mlx-lm installed"
    if installed("torch"):
        return "torch", "torch is installed"
    if installed("mlx"):
        return "mlx", "mlx-lm is installed (torch is not)"
    if installed("llamacpp"):
        return "llamacpp", "llama-cpp-python is installed (torch is not)"
    raise UserError("no backend is installed: pip install 'triattn-local[torch]' (or [mlx] on a Mac)")


def llamacpp_runs(compress: bool, method: str, pruning_mode: str, dtype: str) -> bool:
    """Whether llama.cpp runs these settings as asked: full attention, or TriAttention where the pruning mode is
    left to the backend (auto: global there, its one mode) or is global; the KV type is llama.cpp's own."""
    return dtype == "auto" and (not compress or (method == "triattention" and pruning_mode in ("auto", "global")))


def cpu_gguf_build(model: str):
    """The GGUF build of `model` that `--backend auto` runs on llama.cpp, or None: only where llama-cpp-python is
    installed, torch would run on the CPU (llama.cpp decodes small models several times faster there), and a GGUF
    of the model is at hand (the demo ships one beside its weights; a pulled GGUF build)."""
    from ..registry import resolve_model
    from .llamacpp import gguf_file

    if apple_silicon() or not installed("llamacpp") or torch_gpu_usable():
        return None
    try:
        path = resolve_model(model, backend="llamacpp")
        return path if gguf_file(path) is not None else None
    except UserError:
        return None


def torch_gpu_usable() -> bool:
    """Whether torch would run on a GPU here; without a GPU device node, answered without importing torch."""
    import os

    if not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")):
        return False
    if not installed("torch"):
        return False
    import torch

    return torch.cuda.is_available()


def apple_silicon() -> bool:
    import platform
    import sys

    return sys.platform == "darwin" and platform.machine() == "arm64"


def load_engine(model: str, backend: str = "auto", device: str = "auto", dtype: str = "auto",
                llamacpp_ok: bool = False):
    """Load a model (alias or directory) with the chosen backend; heavy libraries are imported only here.
    llamacpp_ok: the caller's settings are ones llama.cpp runs (TriAttention in global or auto pruning mode, or full
    attention), so auto may pick it on a machine without a GPU where the model has a GGUF build (cpu_gguf_build)."""
    from ..registry import resolve_model

    name, _ = choose_backend(backend)
    gguf = None
    if backend == "auto" and llamacpp_ok and name == "torch" and device in ("auto", "cpu"):
        gguf = cpu_gguf_build(model)
    if gguf is not None:
        name, path = "llamacpp", gguf
    else:
        try:
            path = resolve_model(model, backend=name)  # a pulled name resolves to this backend's build
        except UserError:
            if backend != "auto":
                raise
            name, path = _pulled_for_another_backend(model, name)  # e.g. only its GGUF build was pulled
    if backend == "auto" and name != "llamacpp":
        from .llamacpp import is_gguf_model

        if is_gguf_model(path):  # a GGUF file (or a folder of one) runs on llama.cpp
            name, _ = choose_backend("llamacpp")
    if name == "torch":
        from .torch.engine import TorchEngine

        engine = TorchEngine(str(path), device=device, dtype=dtype)
        engine.model_id = model  # what the user called it: an alias or a path
        return engine
    if name == "mlx":
        from .mlx.engine import MLXEngine

        engine = MLXEngine(str(path), device=device, dtype=dtype)
        engine.model_id = model
        return engine
    if name == "llamacpp":
        from .llamacpp.engine import LlamaCppEngine

        engine = LlamaCppEngine(str(path), device=device, dtype=dtype)
        engine.model_id = model
        return engine
    raise UserError(f"backend {name} is not available")


def _pulled_for_another_backend(model: str, tried: str):
    """(backend, path) of another installed backend that has this name pulled; else the first backend's error."""
    from ..registry import resolve_model

    for other in IMPLEMENTED:
        if other != tried and installed(other):
            try:
                return other, resolve_model(model, backend=other)
            except UserError:
                continue
    return tried, resolve_model(model, backend=tried)  # raises the error a user of the default backend should see
