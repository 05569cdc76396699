"""Will a model fit? Weights plus the KV cache at the TriAttention budget, and the full KV cache at the model's
context length, against the memory of the device it would run on.

Numbers are estimates: weights are what the files hold (scaled when the torch backend runs bf16 weights in float32 on a
CPU), the KV cache is layers x kv_heads x head_dim x 2 (K and V) x dtype bytes per token, and the budgeted cache peaks
at budget + divide_length tokens. Activations and framework overhead are not counted.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "F32": 4, "F16": 2, "BF16": 2, "F64": 8}


@dataclass
class MemoryEstimate:
    weights: int  # bytes the weights take on the device
    kv_per_token: int  # bytes, all layers, K and V
    budget_tokens: int  # peak retained tokens under TriAttention: budget + divide_length
    context: int  # the model's max_position_embeddings (0 if unknown)
    device: str
    total: int | None  # device memory, bytes
    available: int | None

    @property
    def kv_budget(self) -> int:
        return self.kv_per_token * self.budget_tokens

    @property
    def kv_full(self) -> int:
        return self.kv_per_token * self.context

    @property
    def needed(self) -> int:
        return self.weights + self.kv_budget

    @property
    def needed_full(self) -> int:
        return self.weights + self.kv_full

    def fits(self) -> bool | None:
        return None if self.available is None else self.needed <= self.available

    def fits_full(self) -> bool | None:
        return None if self.available is None or not self.context else self.needed_full <= self.available


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def attention_shape(config: dict) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) from a config.json dict (text_config for multimodal configs)."""
    cfg = config.get("text_config", config) if "num_hidden_layers" not in config else config
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    return int(cfg["num_hidden_layers"]), int(cfg.get("num_key_value_heads") or heads), head_dim


def kv_bytes_per_token(config: dict, dtype_bytes: int) -> int:
    layers, kv_heads, head_dim = attention_shape(config)
    return layers * kv_heads * head_dim * 2 * dtype_bytes


def runtime_dtype_bytes(backend: str, device_is_gpu: bool) -> int:
    """What the backend computes in by default: torch runs bfloat16 on CUDA and float32 on CPU; MLX and llama.cpp
    keep a float16 KV cache."""
    if backend == "torch" and not device_is_gpu:
        return 4
    return 2


def stored_dtype_bytes(config: dict) -> int | None:
    """Bytes per weight as stored, from config.json (None for quantized weights or when unknown)."""
    if config.get("quantization_config"):
        return None
    return DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype") or ""))


def device_memory(backend: str) -> tuple[str, int | None, int | None, bool]:
    """(device, total bytes, available bytes, is_gpu) for where the backend would run. torch: the CUDA device if
    torch sees one, else system RAM. Otherwise (MLX on unified memory, llama.cpp on CPU): system RAM."""
    if backend == "torch" and importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return f"GPU 0 ({torch.cuda.get_device_name(0)})", total, free, True
    total, available = system_memory()
    return "system RAM", total, available, False


def system_memory() -> tuple[int | None, int | None]:
    """(total, available) bytes of RAM: psutil if installed, else /proc/meminfo, else sysconf (total only)."""
    if importlib.util.find_spec("psutil") is not None:
        import psutil

        vm = psutil.virtual_memory()
        return vm.total, vm.available
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
        return info.get("MemTotal"), info.get("MemAvailable", info.get("MemFree"))
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None
    except (ValueError, OSError, AttributeError):
        return None, None


def estimate(config: dict | None, weight_file_bytes: int, backend: str, budget: int, divide_length: int,
             device: tuple[str, int | None, int | None, bool] | None = None) -> MemoryEstimate:
    """The estimate for a model with this config and this many bytes of weight files, on this backend's device."""
    name, total, available, is_gpu = device or device_memory(backend)
    run_bytes = runtime_dtype_bytes(backend, is_gpu)
    weights = weight_file_bytes
    kv_per_token = context = 0
    if config:
        stored = stored_dtype_bytes(config)
        if backend == "torch" and stored:  # torch loads float weights in its compute dtype
            weights = weight_file_bytes * run_bytes // stored
        try:
            kv_per_token = kv_bytes_per_token(config, run_bytes)
        except (KeyError, ValueError, TypeError):
            kv_per_token = 0
        cfg = config.get("text_config", config)
        context = int(cfg.get("max_position_embeddings") or config.get("max_position_embeddings") or 0)
    return MemoryEstimate(weights=weights, kv_per_token=kv_per_token, budget_tokens=budget + divide_length,
                          context=context, device=name, total=total, available=available)


def render(est: MemoryEstimate, budget: int):
    """A small rich table and the verdict lines."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title="memory estimate", title_justify="left", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("weights", gib(est.weights))
    if est.kv_per_token:
        table.add_row(f"KV at budget {budget} (peak {est.budget_tokens} tokens)", gib(est.kv_budget))
        if est.context:
            table.add_row(f"full KV at context {est.context}", gib(est.kv_full))
    where = est.device + (f", {gib(est.available)} available" if est.available is not None else "")
    if est.total is not None:
        where += f" of {gib(est.total)}"
    lines = [table, Text(f"device: {where}")]
    fits = est.fits()
    if fits is None:
        lines.append(Text(f"needs about {gib(est.needed)}; free device memory unknown"))
    else:
        verdict = "fits" if fits else "does not fit"
        lines.append(Text(f"{verdict}: weights + KV at budget {budget} need about {gib(est.needed)}",
                          style="green" if fits else "bold red"))
    full = est.fits_full()
    if full is not None:
        tail = "would fit too" if full else "would not fit (the budget is what makes long reasoning fit)"
        lines.append(Text(f"full attention at {est.context} tokens needs about {gib(est.needed_full)}: {tail}"))
    return Group(*lines)
