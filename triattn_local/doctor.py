"""`triattn doctor`: what hardware is here, which backends are installed, and which one `--backend auto` picks."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil

PACKAGES = ("torch", "transformers", "triton", "mlx", "mlx-lm", "llama-cpp-python", "numpy", "safetensors")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware() -> list[tuple[str, str]]:
    """(what, finding) lines; imports torch / mlx only when they are installed."""
    rows = [("cpu", f"{platform.machine()} · {os.cpu_count()} cores · {platform.system()} {platform.release()}")]
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                kind = "ROCm/HIP" if torch.version.hip else f"CUDA {torch.version.cuda}"
                rows.append((f"gpu {i}", f"{p.name} · sm_{p.major}{p.minor} · {p.total_memory / 2**30:.1f} GiB · {kind}"))
        else:
            rows.append(("cuda", "no CUDA device visible to torch" + (" (CPU build)" if torch.version.cuda is None else "")))
        if getattr(torch.version, "hip", None):
            rows.append(("rocm", f"torch built for HIP {torch.version.hip}"))
    if shutil.which("rocminfo") or os.path.isdir("/opt/rocm"):
        rows.append(("rocm", "ROCm installation found (/opt/rocm or rocminfo)"))
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        metal = "Apple Silicon"
        if importlib.util.find_spec("mlx") is not None:
            import mlx.core as mx

            metal += " · Metal available" if mx.metal.is_available() else " · Metal not available"
        rows.append(("metal", metal))
    return rows
