"""The TriAttention KV cache for transformers 5 models: a DynamicCache whose rows can be compacted.

Each layer holds K/V [batch=1, kv_heads, T, head_dim] of post-RoPE keys at their original positions. Compaction
gathers the kept slots of every (layer, KV head); the slot count stays the same across heads, so tensors stay
rectangular. transformers builds the causal mask from the slot count (get_query_offset), while RoPE uses the
position_ids we pass, so a compacted cache needs no special mask: every cached slot precedes the new tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from ...scorer import TriAttentionScorer


class TriAttentionCache(DynamicCache):
    def compact(self, keep: np.ndarray) -> None:
        """Keep slots keep[layer, kv_head, :] of every layer."""
        for i, layer in enumerate(self.layers):
            idx = torch.as_tensor(keep[i], device=layer.keys.device)  # [Hkv, B]
            idx = idx[None, :, :, None].expand(1, -1, -1, layer.keys.shape[-1])
            layer.keys = torch.gather(layer.keys, 2, idx)
            layer.values = torch.gather(layer.values, 2, idx.expand(1, -1, -1, layer.values.shape[-1]))

    def head_scores(self, scorer: TriAttentionScorer, round_start: int) -> np.ndarray:
        """Per-query-head scores [layers, heads, T]: the virtual-query dot product plus the magnitude term."""
        if scorer.offset_aggregation != "mean":  # no linear form: use the reference on host copies
            return np.stack([
                scorer.head_scores(i, layer.keys[0].float().cpu().numpy(), round_start)
                for i, layer in enumerate(self.layers)
            ])
        rq = scorer.round_queries(round_start)
        return np.stack([
            score_keys_torch(layer.keys[0], rq.virtual_query[i], rq.magnitude_weight[i], scorer.pairing)
            .cpu().numpy()
            for i, layer in enumerate(self.layers)
        ])


def score_keys_torch(keys: torch.Tensor, virtual_query: np.ndarray, magnitude_weight: np.ndarray,
                     pairing: str = "half") -> torch.Tensor:
    """keys [kv_heads, T, D] → scores [heads, T] (float32), the torch form of TriAttentionScorer.head_scores."""
    heads, dim = virtual_query.shape
    group = heads // keys.shape[0]
    k = keys.float().repeat_interleave(group, dim=0)  # [H, T, D]
    vq = torch.as_tensor(virtual_query, device=k.device, dtype=torch.float32)
    w = torch.as_tensor(magnitude_weight, device=k.device, dtype=torch.float32)
    if pairing == "half":
        re, im = k[..., : dim // 2], k[..., dim // 2:]
    else:
        re, im = k[..., 0::2], k[..., 1::2]
    trig = torch.einsum("htd,hd->ht", k, vq)
    magnitude = torch.einsum("htf,hf->ht", torch.sqrt(re * re + im * im), w)
    return trig + magnitude
