"""Stats format v1: one safetensors file per model (spec in FORMAT.md).

Tensors hold the per-(layer, query head) pre-RoPE query statistics over the head_dim/2 frequency pairs and the RoPE
frequencies they were measured with; string metadata says which model they belong to. Loading never unpickles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..rope import ModelShape

FORMAT_NAME = "triattn-stats"
FORMAT_VERSION = 1
TENSORS = ("q_mean_real", "q_mean_imag", "q_abs_mean", "inv_freq", "freq_scale")
_INT_FIELDS = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "calibration_tokens")


@dataclass
class StatsMeta:
    model_id: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_pairing: str
    rope_type: str
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)
    model_revision: str = ""
    calibration_tokens: int = 0
    calibration_text_sha256: str = ""
    source: str = "triattn calibrate"
    # Original metadata of an imported reference file, kept so that export gives the same file back.
    reference_metadata: dict | None = None

    def to_strings(self) -> dict[str, str]:
        out = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
        for key, value in self.__dict__.items():
            if key in ("rope_scaling", "reference_metadata"):
                if value is not None:
                    out[key] = json.dumps(value, sort_keys=False)
            else:
                out[key] = str(value)
        return out

    @classmethod
    def from_strings(cls, raw: dict[str, str], where: str) -> "StatsMeta":
        if raw.get("format") != FORMAT_NAME:
            raise UserError(f"{where}: not a triattn stats file (format={raw.get('format')!r})")
        if raw.get("format_version") != str(FORMAT_VERSION):
            raise UserError(f"{where}: stats format version {raw.get('format_version')} is not supported (need 1)")
        try:
            kwargs = {}
            for name in cls.__dataclass_fields__:
                if name not in raw:
                    continue
                value = raw[name]
                if name in _INT_FIELDS:
                    value = int(value)
                elif name == "rope_theta":
                    value = float(value)
                elif name in ("rope_scaling", "reference_metadata"):
                    value = json.loads(value)
                kwargs[name] = value
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: corrupt stats metadata ({e})") from None


@dataclass
class QueryStats:
    """Pre-RoPE query statistics of every (layer, query head): complex mean and mean magnitude per frequency pair."""

    meta: StatsMeta
    q_mean_real: np.ndarray  # [layers, heads, head_dim/2] float32
    q_mean_imag: np.ndarray
    q_abs_mean: np.ndarray
    inv_freq: np.ndarray  # [head_dim/2] float64: ω_f the stats were measured with
    freq_scale: np.ndarray  # [head_dim/2] float64: s_f, the cos/sin scale (yarn attention factor, else 1)

    @property
    def q_mean(self) -> np.ndarray:
        return self.q_mean_real.astype(np.float64) + 1j * self.q_mean_imag.astype(np.float64)

    def concentration(self) -> np.ndarray:
        """Per (layer, head) mean resultant length R_f = |E q_f| / E|q_f|, averaged over pairs with weights (E|q_f|)²
        (each pair's share of the query energy): 1 = queries sit at a fixed centre, 0 = no preferred direction."""
        m = self.q_abs_mean.astype(np.float64)
        return (np.abs(self.q_mean) * m).sum(-1) / np.maximum((m * m).sum(-1), 1e-30)

    def validate(self, where: str) -> None:
        m = self.meta
        expect = (m.num_layers, m.num_heads, m.head_dim // 2)
        for name in ("q_mean_real", "q_mean_imag", "q_abs_mean"):
            arr = getattr(self, name)
            if arr.shape != expect:
                raise UserError(f"{where}: {name} has shape {list(arr.shape)}, metadata says {list(expect)}")
            if not np.isfinite(arr).all():
                raise UserError(f"{where}: {name} holds NaN or infinite values")
        for name in ("inv_freq", "freq_scale"):
            if getattr(self, name).shape != (m.head_dim // 2,):
                raise UserError(f"{where}: {name} has shape {list(getattr(self, name).shape)}, need [{m.head_dim // 2}]")
        if m.num_heads % m.num_kv_heads:
            raise UserError(f"{where}: {m.num_heads} heads is not a multiple of {m.num_kv_heads} kv heads")
        if m.rope_pairing not in ("half", "interleaved"):
            raise UserError(f"{where}: unknown rope_pairing {m.rope_pairing!r}")

    def check_matches(self, shape: ModelShape, where: str = "stats") -> None:
        """Refuse stats made for another model, naming both values."""
        m = self.meta
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "rope_type"):
            mine, theirs = getattr(m, name), getattr(shape, name)
            if mine != theirs:
                raise UserError(f"{where} do not match the model: {name} is {mine} in the stats, {theirs} in the model")
        if m.rope_pairing != shape.rope_pairing:
            raise UserError(
                f"{where} do not match the model: rope_pairing is {m.rope_pairing} in the stats, "
                f"{shape.rope_pairing} in the model"
            )
        inv_freq, _ = shape.rope_frequencies()
        if not np.allclose(self.inv_freq, inv_freq, rtol=1e-4, atol=0):
            worst = int(np.argmax(np.abs(self.inv_freq - inv_freq) / inv_freq))
            raise UserError(
                f"{where} do not match the model: RoPE frequency {worst} is {self.inv_freq[worst]:.6g} in the stats, "
                f"{inv_freq[worst]:.6g} in the model (rope_theta {m.rope_theta:g} vs {shape.rope_theta:g})"
            )

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save

        self.validate(str(path))
        tensors = {
            "q_mean_real": np.ascontiguousarray(self.q_mean_real, dtype=np.float32),
            "q_mean_imag": np.ascontiguousarray(self.q_mean_imag, dtype=np.float32),
            "q_abs_mean": np.ascontiguousarray(self.q_abs_mean, dtype=np.float32),
            "inv_freq": np.ascontiguousarray(self.inv_freq, dtype=np.float64),
            "freq_scale": np.ascontiguousarray(self.freq_scale, dtype=np.float64),
        }
        from ..files import write_atomic

        # a unique name beside it, renamed over it: never a half-written stats file (a few hundred KiB at most)
        write_atomic(path, save(tensors, metadata=self.meta.to_strings()))

    @classmethod
    def load(cls, path: str | Path) -> "QueryStats":
        from safetensors import SafetensorError, safe_open

        where = str(path)
        if not Path(path).is_file():
            raise UserError(f"{where}: stats file not found")
        try:
            with safe_open(where, framework="numpy") as f:
                raw_meta = f.metadata() or {}
                names = set(f.keys())
                missing = [t for t in TENSORS if t not in names]
                if missing and raw_meta.get("format") == FORMAT_NAME:
                    raise UserError(f"{where}: corrupt stats file (missing tensors {', '.join(missing)})")
                meta = StatsMeta.from_strings(raw_meta, where)
                tensors = {name: f.get_tensor(name) for name in TENSORS}
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{where}: not a readable stats file ({str(e).splitlines()[0] if str(e) else e})") from None
        stats = cls(meta=meta, **tensors)
        stats.validate(where)
        return stats

    def with_meta(self, **changes) -> "QueryStats":
        return replace(self, meta=replace(self.meta, **changes))


def meta_for_model(shape: ModelShape, model_id: str, **extra) -> StatsMeta:
    """Stats metadata for a model, from its shape."""
    return StatsMeta(
        model_id=model_id,
        architecture=shape.architecture,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        rope_pairing=shape.rope_pairing,
        rope_type=shape.rope_type,
        rope_theta=shape.rope_theta,
        rope_scaling=dict(shape.rope_scaling),
        **extra,
    )
