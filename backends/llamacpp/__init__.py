"""llama.cpp backend (GGUF models through llama-cpp-python: CPU, HIP/ROCm, CUDA, Metal, Vulkan builds).

Nothing here imports llama_cpp, so `--backend auto` can ask cheaply whether a path is a GGUF model.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import UserError


def gguf_file(path: str | Path) -> Path | None:
    """The GGUF file a model path names: the file itself, or the one .gguf file in a directory; else None."""
    p = Path(path)
    if p.is_file():
        return p if p.suffix == ".gguf" else None
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        if len(found) > 1:
            raise UserError(f"{path}: several .gguf files ({', '.join(f.name for f in found)}); name one")
        return found[0] if found else None
    return None


def is_gguf_model(path: str | Path) -> bool:
    """True for a .gguf file or a directory holding one and no Hugging Face config.json (what auto sends here)."""
    p = Path(path)
    return gguf_file(p) is not None and not (p.is_dir() and (p / "config.json").is_file())
