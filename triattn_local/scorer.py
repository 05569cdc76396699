"""The TriAttention key scorer, written once (numpy). Backends add only a fast path, tested against this.

A cached post-RoPE key k (complex pairs k_f) is scored for a query head with pre-RoPE query statistics
(complex mean q̄_f, mean magnitude m_f) at future query positions t = round_start + offsets:

    S(k, t) = Σ_f s_f² Re(q̄_f · conj(k_f) · e^{i t ω_f})  +  Σ_f s_f² (m_f − |q̄_f|) |k_f|

averaged (or maxed) over the offsets. With the mean, the first term is linear in k:
Σ_f Re(conj(k_f) · v_f) with the "virtual query" v_f = s_f² q̄_f · mean_t e^{i t ω_f}, so each key costs one dot
product with a per-head vector computed once per round, plus one with |k_f|. Keys keep their original positions;
nothing is re-rotated: the rotation already baked into k supplies the (t − p) phase.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .rope import from_complex_pairs, to_complex_pairs
from .stats.format import QueryStats

DEFAULT_MAX_OFFSET = 65536
OFFSET_AGGREGATIONS = ("mean", "max")


def geometric_offsets(max_offset: int = DEFAULT_MAX_OFFSET) -> np.ndarray:
    """1, 2, 4, … up to max_offset: future query distances the score looks at."""
    return 2.0 ** np.arange(int(np.log2(max_offset)) + 1)


@dataclass
class RoundQueries:
    """What a backend needs to score one layer's keys in one round (mean over offsets)."""

    virtual_query: np.ndarray  # [layers, heads, head_dim] float32, in the keys' pair layout
    magnitude_weight: np.ndarray  # [layers, heads, head_dim/2] float32: s_f² (m_f − |q̄_f|)


class TriAttentionScorer:
    """Scores cached post-RoPE keys with one model's query stats."""

    def __init__(self, stats: QueryStats, offsets: np.ndarray | None = None, offset_aggregation: str = "mean"):
        if offset_aggregation not in OFFSET_AGGREGATIONS:
            raise ValueError(f"offset aggregation must be one of {OFFSET_AGGREGATIONS}")
        self.stats = stats
        self.pairing = stats.meta.rope_pairing
        self.offsets = geometric_offsets() if offsets is None else np.asarray(offsets, dtype=np.float64)
        self.offset_aggregation = offset_aggregation
        self.omega = stats.inv_freq.astype(np.float64)
        self.scale_sq = stats.freq_scale.astype(np.float64) ** 2
        self.q_mean = stats.q_mean  # complex128 [L, H, F]
        self.magnitude_weight = (self.scale_sq * (stats.q_abs_mean - np.abs(self.q_mean))).astype(np.float32)
        self._weighted_mean = self.scale_sq * self.q_mean  # s_f² q̄_f once: the product costs ~1 ms a round
        self.group_size = stats.meta.num_heads // stats.meta.num_kv_heads

    def round_queries(self, round_start: int) -> RoundQueries:
        """Virtual queries for the round that starts at position round_start (mean aggregation only)."""
        if self.offset_aggregation != "mean":
            raise ValueError("virtual queries exist only for mean aggregation over offsets")
        phase = np.exp(1j * np.outer(round_start + self.offsets, self.omega)).mean(axis=0)  # [F]
        v = self._weighted_mean * phase
        return RoundQueries(from_complex_pairs(v, self.pairing, np.float32), self.magnitude_weight)

    def head_scores(self, layer: int, keys: np.ndarray, round_start: int) -> np.ndarray:
        """Scores [heads, T] of one layer's keys [kv_heads, T, head_dim] for each query head."""
        keys = keys[np.arange(self.stats.meta.num_heads) // self.group_size].astype(np.float64)  # [H, T, D]
        k = to_complex_pairs(keys, self.pairing)  # [H, T, F]
        magnitude = np.abs(k) @ self.magnitude_weight[layer][..., None].astype(np.float64)  # [H, T, 1]
        if self.offset_aggregation == "mean":
            vq = self.round_queries(round_start).virtual_query[layer].astype(np.float64)
            trig = np.einsum("htd,hd->ht", keys, vq)
        else:
            trig = self._direct_trig(layer, k, round_start).max(axis=-1)
        return (trig + magnitude[..., 0]).astype(np.float32)

    def _direct_trig(self, layer: int, k: np.ndarray, round_start: int) -> np.ndarray:
        """The trigonometric term evaluated literally at every offset: [H, T, offsets]."""
        t = round_start + self.offsets
        rot = np.exp(1j * t[:, None] * self.omega[None, :])  # [O, F]
        inner = self.q_mean[layer][:, None, :] * np.conj(k)  # [H, T, F]
        return np.einsum("htf,of,f->hto", inner, rot, self.scale_sq).real
