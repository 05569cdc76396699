"""`triattn doctor`: what hardware is here, which backends are installed, and which one `--backend auto` picks."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil

# Every backend selects as the reference does (policy.py); llama.cpp's KV cells hold every layer and head at once,
# so only one keep set for the whole cache is possible there.
PRUNING_MODES_BY_BACKEND = {
    "torch": "per_head (default), per_layer_head, global",
    "mlx": "per_head (default), per_layer_head, global",
    "llamacpp": "global only (one KV cell holds every layer and head)",
}

PACKAGES = ("torch", "transformers", "triton", "mlx", "mlx-lm", "llama-cpp-python", "numpy", "safetensors")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


ARCHITECTURES = {(8, 0): "Ampere (A100)", (8, 6): "Ampere (RTX 30)", (8, 7): "Ampere (Jetson Orin)",
                 (8, 9): "Ada (RTX 40)", (9, 0): "Hopper (H100/H200)", (10, 0): "Blackwell (B200)",
                 (12, 0): "Blackwell (RTX 50)", (12, 1): "Blackwell (DGX Spark GB10)"}
TESTED_ARCHITECTURES = {(9, 0)}  # where tests/test_triton_kernels.py and test_static_runner.py ran on the GPU


def cuda_kernel_note(major: int, minor: int) -> str:
    """The GPU's architecture and what that means for triattn's Triton kernels and CUDA graphs."""
    name = ARCHITECTURES.get((major, minor), "unknown architecture")
    if major < 8:
        return f"{name} sm_{major}{minor}: below sm_80, the Triton kernels are off (torch fallbacks are used)"
    if (major, minor) in TESTED_ARCHITECTURES:
        return f"{name} sm_{major}{minor}: Triton kernels and CUDA-graph decode tested on this architecture"
    note = (f"{name} sm_{major}{minor}: Triton kernels are generic (sm_80+) but untested on this architecture; "
            "check with TRIATTN_TEST_DEVICE=cuda pytest tests/test_triton_kernels.py tests/test_decode_kernels.py "
            "tests/test_static_runner.py")
    if major >= 12 and not os.environ.get("TRITON_PTXAS_PATH"):
        # Triton wheels built against CUDA 12.8 bundle a ptxas that does not know sm_121a (GB10).
        note += "; if Triton fails with 'sm_121a is not defined', export TRITON_PTXAS_PATH=/usr/local/cuda/bin/ptxas"
    return note


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
                if not torch.version.hip:
                    rows.append((f"kernels {i}", cuda_kernel_note(p.major, p.minor)))
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
    elif importlib.util.find_spec("mlx") is not None:  # MLX's Linux builds: CPU, or CUDA with mlx[cuda]
        try:
            import mlx.core as mx

            rows.append(("mlx", f"default device {mx.default_device()}"))
        except ImportError as e:  # e.g. mlx without its [cpu] or [cuda] extra on Linux
            rows.append(("mlx", f"installed but not importable ({e}); on Linux: pip install 'mlx[cpu]'"))
    if importlib.util.find_spec("llama_cpp") is not None:  # which llama.cpp build: GPU offload or CPU only
        import llama_cpp

        gpu = llama_cpp.llama_supports_gpu_offload()
        rows.append(("llama.cpp", "GPU offload build (HIP, CUDA, Metal or Vulkan)" if gpu else
                     "CPU build (rebuild with CMAKE_ARGS=\"-DGGML_HIP=on\" or -DGGML_CUDA=on for a GPU)"))
    return rows
