"""A GGUF model's attention shape and RoPE (rope.ModelShape) from its header, read here without llama.cpp.

The header holds key/values (`qwen3.attention.head_count`, `llama.rope.freq_base` …) and tensor descriptions. The
converter records linear and yarn RoPE scaling as key/values, but Llama 3's rope scaling only as a `rope_freqs`
tensor of per-frequency factors: its parameters are recovered from that tensor and checked to reproduce it.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import UserError
from ...rope import ModelShape

# GGUF value types → struct format of a scalar (8 = string, 9 = array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
HF_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclass
class GGUFHeader:
    metadata: dict  # scalar and string values (arrays are skipped, except their length under "<key>#len")
    tensors: dict  # name → (ggml type, shape, absolute byte offset)
    path: Path

    def tensor_f32(self, name: str) -> np.ndarray | None:
        """An F32 tensor's values (small ones, e.g. rope_freqs), or None when the file has no such tensor."""
        if name not in self.tensors:
            return None
        ggml_type, shape, offset = self.tensors[name]
        if ggml_type != 0:
            raise UserError(f"{self.path}: tensor {name} is not F32")
        count = int(np.prod(shape))
        with open(self.path, "rb") as f:
            f.seek(offset)
            return np.frombuffer(f.read(4 * count), dtype=np.float32).copy()


def read_header(path: str | Path) -> GGUFHeader:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _parse(f, path)
    except (OSError, struct.error, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None


def _parse(f, path: Path) -> GGUFHeader:
    def read(fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, f.read(size))[0]

    def string() -> str:
        return f.read(read("Q")).decode("utf-8")

    def skip_array(etype: int, count: int) -> None:
        if etype in _SCALARS:
            f.seek(struct.calcsize("<" + _SCALARS[etype]) * count, 1)
        elif etype == 8:
            for _ in range(count):
                f.seek(read("Q"), 1)
        else:  # nested arrays
            for _ in range(count):
                skip_array(read("I"), read("Q"))

    if f.read(4) != b"GGUF":
        raise ValueError("bad magic")
    version = read("I")
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    n_tensors, n_kv = read("Q"), read("Q")
    metadata = {}
    for _ in range(n_kv):
        key, vtype = string(), read("I")
        if vtype == 8:
            metadata[key] = string()
        elif vtype == 9:
            etype, count = read("I"), read("Q")
            metadata[key + "#len"] = count
            skip_array(etype, count)
        else:
            metadata[key] = read(_SCALARS[vtype])
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [read("Q") for _ in range(read("I"))]
        infos.append((name, read("I"), dims, read("Q")))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-f.tell() // alignment) * alignment
    tensors = {name: (t, dims, data_start + off) for name, t, dims, off in infos}
    return GGUFHeader(metadata, tensors, path)


def model_shape(header: GGUFHeader) -> ModelShape:
    """The ModelShape of a GGUF decoder, in HF terms (rope_pairing "half": the backend hands keys over in it)."""
    m = header.metadata
    arch = m.get("general.architecture")
    if arch is None:
        raise UserError(f"{header.path}: no general.architecture in the GGUF header")

    def get(key: str, default=None):
        return m.get(f"{arch}.{key}", default)

    layers, heads = get("block_count"), get("attention.head_count")
    if layers is None or heads is None or heads == 0:
        raise UserError(f"{header.path}: architecture {arch!r} has no attention head count: not a supported decoder")
    kv_heads = get("attention.head_count_kv", heads)
    head_dim = get("attention.key_length") or get("embedding_length") // heads
    if get("rope.dimension_count", head_dim) != head_dim:
        raise UserError(f"{header.path}: partial rotary embeddings are not supported")
    if get("attention.sliding_window"):
        raise UserError(f"{header.path}: sliding-window attention ({arch}) is not supported by the llamacpp backend")
    theta = float(get("rope.freq_base", 10000.0))
    max_pos = int(get("context_length", 0))
    scaling = get("rope.scaling.type", "none")
    params: dict = {}
    rope_type = "default"
    if scaling == "linear":
        rope_type, params = "linear", {"factor": float(get("rope.scaling.factor"))}
    elif scaling == "yarn":
        rope_type = "yarn"
        params = {"factor": float(get("rope.scaling.factor")),
                  "original_max_position_embeddings": int(get("rope.scaling.original_context_length"))}
        for key, name in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow"),
                          ("rope.scaling.yarn_attn_factor", "attention_factor")):
            if get(key) is not None:
                params[name] = float(get(key))
    elif scaling not in ("none", None):
        raise UserError(f"{header.path}: rope scaling {scaling!r} is not supported")
    shape = ModelShape(
        architecture=HF_ARCHITECTURES.get(arch, arch), num_layers=int(layers), num_heads=int(heads),
        num_kv_heads=int(kv_heads), head_dim=int(head_dim), rope_theta=theta, rope_type=rope_type,
        rope_scaling=params, max_position_embeddings=max_pos,
    )
    factors = header.tensor_f32("rope_freqs.weight")
    if factors is not None:
        shape = _with_llama3(shape, factors, get("rope.scaling.original_context_length"), header.path)
    return shape


def _with_llama3(shape: ModelShape, factors: np.ndarray, orig: int | None, where: Path) -> ModelShape:
    """Llama 3 rope scaling recovered from the per-frequency factors the converter wrote (ω_f = ω⁰_f / factor_f)."""
    from dataclasses import replace

    base, _ = replace(shape, rope_type="default", rope_scaling={}).rope_frequencies()
    target = base / factors.astype(np.float64)
    factor = float(factors.max())
    low, high = 1.0, 4.0
    candidates = [orig, 8192]
    wavelen = 2 * math.pi / base
    for f, w in zip(factors, wavelen):  # a factor strictly between 1 and `factor` pins the original length
        if 1 + 1e-6 < f < factor - 1e-6:
            smooth = (1 / f - 1 / factor) / (1 - 1 / factor)
            candidates.insert(0, round(w * (smooth * (high - low) + low)))
    for c in candidates:
        if not c:
            continue
        params = {"factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                  "original_max_position_embeddings": int(c)}
        candidate = replace(shape, rope_type="llama3", rope_scaling=params)
        if np.allclose(candidate.rope_frequencies()[0], target, rtol=1e-5, atol=0):
            return candidate
    raise UserError(f"{where}: its rope_freqs factors match no Llama 3 rope scaling this backend knows")
