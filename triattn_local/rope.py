"""RoPE frequencies from a Hugging Face config, in numpy.

The scorer needs, per frequency pair f, the angular frequency ω_f and the cos/sin scale s_f that the model applies.
They are computed here once, from config.json alone, so that stats can be made and checked without loading weights
and without any backend library. Supported rope types: default, linear, llama3, yarn.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ModelShape:
    """What the scorer and the stats format need to know about a model: its attention shape and its RoPE."""

    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_type: str
    rope_scaling: dict = field(default_factory=dict)
    rope_pairing: str = "half"  # HF checkpoints pair dim f with f + D/2
    max_position_embeddings: int = 0

    @property
    def num_freqs(self) -> int:
        return self.head_dim // 2

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelShape":
        """Read the attention shape and RoPE parameters from a config.json dict (transformers 4 or 5 style)."""
        cfg = cfg.get("text_config", cfg) if "num_attention_heads" not in cfg else cfg
        try:
            heads = int(cfg["num_attention_heads"])
            layers = int(cfg["num_hidden_layers"])
        except KeyError as e:
            raise UserError(f"config.json has no {e.args[0]!r}: not a decoder model config") from None
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
        params = dict(cfg.get("rope_parameters") or {})
        if "rope_theta" not in params:  # transformers 4 layout: rope_theta + rope_scaling
            params.update(cfg.get("rope_scaling") or {})
            params["rope_theta"] = cfg.get("rope_theta", 10000.0)
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        theta = float(params.pop("rope_theta"))
        if float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
            raise UserError("partial rotary embeddings are not supported (partial_rotary_factor != 1)")
        params.pop("partial_rotary_factor", None)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UserError(f"unsupported rope type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        max_pos = int(cfg.get("max_position_embeddings") or 0)
        if rope_type in ("llama3", "yarn") and max_pos:  # as transformers' standardize_rope_params does
            params.setdefault("original_max_position_embeddings", max_pos)
        archs = cfg.get("architectures") or [cfg.get("model_type", "unknown")]
        return cls(
            architecture=str(archs[0]),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rope_theta=theta,
            rope_type=rope_type,
            rope_scaling=params,
            max_position_embeddings=max_pos,
        )

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "ModelShape":
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise UserError(f"{path}: not a model directory (no config.json)")
        try:
            cfg = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{config_path}: unreadable config ({e})") from None
        return cls.from_hf_config(cfg)

    def rope_frequencies(self) -> tuple[np.ndarray, np.ndarray]:
        """(inv_freq ω_f, scale s_f), both float64 of length head_dim/2."""
        return rope_frequencies(self)


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def _llama3(inv_freq: np.ndarray, p: dict) -> np.ndarray:
    factor = float(p["factor"])
    low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old_len = float(p["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled)


def _yarn(theta: float, dim: int, p: dict, max_pos: int) -> tuple[np.ndarray, float]:
    orig = float(p["original_max_position_embeddings"])
    factor = p.get("factor")
    factor = float(factor) if factor is not None else max_pos / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = p.get("attention_factor")
    if attn is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
    beta_fast, beta_slow = float(p.get("beta_fast") or 32), float(p.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    inv = (1 / (factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation
    return inv, float(attn)


def rope_frequencies(shape: ModelShape) -> tuple[np.ndarray, np.ndarray]:
    dim, p = shape.head_dim, shape.rope_scaling
    inv = _default_inv_freq(shape.rope_theta, dim)
    scale = 1.0
    if shape.rope_type == "linear":
        inv = inv / float(p["factor"])
    elif shape.rope_type == "llama3":
        inv = _llama3(inv, p)
    elif shape.rope_type == "yarn":
        inv, scale = _yarn(shape.rope_theta, dim, p, shape.max_position_embeddings)
    return inv, np.full(dim // 2, scale, dtype=np.float64)


def to_complex_pairs(x: np.ndarray, pairing: str = "half") -> np.ndarray:
    """Last axis of size D → complex of size D/2: (x_f, x_{f+D/2}) for "half", (x_{2f}, x_{2f+1}) for "interleaved"."""
    d = x.shape[-1] // 2
    if pairing == "half":
        return x[..., :d] + 1j * x[..., d:]
    if pairing == "interleaved":
        return x[..., 0::2] + 1j * x[..., 1::2]
    raise ValueError(f"unknown rope pairing {pairing!r}")


def from_complex_pairs(z: np.ndarray, pairing: str = "half", dtype=None) -> np.ndarray:
    """Inverse of to_complex_pairs: complex D/2 → real D in the given layout, as `dtype` (default: z's real dtype).
    Written into one array (a cast on assignment rounds as astype does): concatenating and then casting took ~10x
    longer for a round's virtual queries of a 36-layer model."""
    f = z.shape[-1]
    out = np.empty(z.shape[:-1] + (2 * f,), dtype=z.real.dtype if dtype is None else dtype)
    if pairing == "half":
        out[..., :f], out[..., f:] = z.real, z.imag
    else:
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out
