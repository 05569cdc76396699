"""The TriAttention key scorer in MLX: the virtual-query form of triattn_local.scorer, for keys that stay on the device.

score_keys_mlx is plain MLX ops (runs on every MLX build: Metal, CUDA, CPU); score_keys_metal is the same sum fused
into one Metal kernel (one thread per cached key, no [heads, T, D] intermediate), used only where Metal is
available. Both return per-query-head scores; the core's GQA grouping and budget policy decide what is kept.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ...scorer import TriAttentionScorer


def score_keys_mlx(keys: mx.array, virtual_query: np.ndarray, magnitude_weight: np.ndarray,
                   pairing: str = "half") -> mx.array:
    """keys [..., kv_heads, T, D] → scores [..., heads, T] (float32): Σ_d k_d v_d + Σ_f |k_f| w_f per query head.

    Query head h reads KV head h // group, as in TriAttentionScorer.head_scores; the keys are not repeated over the
    group: each KV head's keys meet its group's virtual queries in one matmul."""
    heads, dim = virtual_query.shape
    kv_heads, t = keys.shape[-3], keys.shape[-2]
    group = heads // kv_heads
    k = keys.astype(mx.float32)
    vq = mx.array(virtual_query, dtype=mx.float32).reshape(kv_heads, group, dim)
    w = mx.array(magnitude_weight, dtype=mx.float32).reshape(kv_heads, group, dim // 2)
    if pairing == "half":
        re, im = k[..., : dim // 2], k[..., dim // 2:]
    else:
        re, im = k[..., 0::2], k[..., 1::2]
    magnitude = mx.sqrt(re * re + im * im)  # [..., Hkv, T, F]
    scores = k @ vq.swapaxes(-1, -2) + magnitude @ w.swapaxes(-1, -2)  # [..., Hkv, T, group]
    scores = scores.swapaxes(-1, -2)  # [..., Hkv, group, T]
    return scores.reshape(*keys.shape[:-3], heads, t)


_METAL_SOURCE = """
    uint slots = keys_shape[2];  // read at run time: no new compile as the cache length changes
    uint t = thread_position_in_grid.x;
    uint row = thread_position_in_grid.y;  // batch * kv_heads + kv_head
    if (t >= slots) return;
    uint kv_head = row % keys_shape[1];
    uint base = (row * slots + t) * DIM;
    for (uint g = 0; g < GROUP; ++g) {
        uint h = kv_head * GROUP + g;
        float acc = 0.0f;
        for (uint f = 0; f < DIM / 2; ++f) {
            uint i_re = INTERLEAVED ? 2 * f : f;
            uint i_im = INTERLEAVED ? 2 * f + 1 : f + DIM / 2;
            float re = static_cast<float>(keys[base + i_re]);
            float im = static_cast<float>(keys[base + i_im]);
            acc += re * vq[h * DIM + i_re] + im * vq[h * DIM + i_im];
            acc += metal::sqrt(re * re + im * im) * w[h * (DIM / 2) + f];
        }
        out[(row * GROUP + g) * slots + t] = acc;
    }
"""

_metal_kernel = None


def score_keys_metal(keys: mx.array, virtual_query: np.ndarray, magnitude_weight: np.ndarray,
                     pairing: str = "half") -> mx.array:
    """score_keys_mlx fused into one Metal kernel; keys [B, kv_heads, T, D] → [B, heads, T]. Metal only."""
    global _metal_kernel
    if _metal_kernel is None:
        _metal_kernel = mx.fast.metal_kernel(name="triattn_score_keys", input_names=["keys", "vq", "w"],
                                             output_names=["out"], source=_METAL_SOURCE)
    batch, kv_heads, t, dim = keys.shape
    heads = virtual_query.shape[0]
    (out,) = _metal_kernel(
        inputs=[keys, mx.array(virtual_query, dtype=mx.float32), mx.array(magnitude_weight, dtype=mx.float32)],
        template=[("DIM", dim), ("GROUP", heads // kv_heads), ("INTERLEAVED", pairing == "interleaved")],
        grid=(t, batch * kv_heads, 1),
        threadgroup=(min(256, t), 1, 1),
        output_shapes=[(batch, heads, t)],
        output_dtypes=[mx.float32],
    )
    return out


def use_metal_kernel() -> bool:
    """The fused kernel runs where MLX has Metal and the default device is the GPU."""
    return mx.metal.is_available() and mx.default_device() == mx.gpu


def head_scores(layer_keys: list[mx.array], scorer: TriAttentionScorer, round_start: int) -> np.ndarray:
    """Scores [B, layers, heads, T] of every layer's keys [B, kv_heads, T, D] (one copy to the host)."""
    if scorer.offset_aggregation != "mean":  # no linear form: the reference on host copies
        keys = [np.array(k.astype(mx.float32)) for k in layer_keys]
        return np.stack([np.stack([scorer.head_scores(i, k[b], round_start) for i, k in enumerate(keys)])
                         for b in range(keys[0].shape[0])])
    rq = scorer.round_queries(round_start)
    score = score_keys_metal if use_metal_kernel() else score_keys_mlx
    scores = [score(k, rq.virtual_query[i], rq.magnitude_weight[i], scorer.pairing) for i, k in enumerate(layer_keys)]
    return np.array(mx.stack(scores, axis=1))
