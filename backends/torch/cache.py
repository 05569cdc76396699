"""The TriAttention KV cache for transformers 5 models: a DynamicCache whose rows can be compacted.

Each layer holds K/V [batch, kv_heads, T, head_dim] of post-RoPE keys at their original positions; row b is
sequence b, and all rows advance in lockstep. Compaction gathers the kept slots of every (row, layer, KV head); the
slot count stays the same across rows and heads, so tensors stay rectangular. transformers builds the causal mask
from the slot count (get_query_offset), while RoPE uses the position_ids we pass, so a compacted cache needs no
special mask: every cached slot precedes the new tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from ...scorer import TriAttentionScorer
from . import kernels


class TriAttentionCache(DynamicCache):
    def compact(self, keep: np.ndarray | torch.Tensor) -> None:
        """Keep slots keep[row, layer, kv_head, :] of every layer."""
        keep = torch.as_tensor(keep, device=self.layers[0].keys.device)  # one copy to the device
        for i, layer in enumerate(self.layers):
            idx = keep[:, i, :, :, None].to(layer.keys.device)  # [B, Hkv, K, 1]
            layer.keys = torch.gather(layer.keys, 2, idx.expand(-1, -1, -1, layer.keys.shape[-1]))
            layer.values = torch.gather(layer.values, 2, idx.expand(-1, -1, -1, layer.values.shape[-1]))

    def head_scores(self, scorer: TriAttentionScorer, round_start: int) -> np.ndarray:
        """Per-query-head scores [B, layers, heads, T]: the virtual-query dot product plus the magnitude term."""
        if scorer.offset_aggregation != "mean":  # no linear form: use the reference on host copies
            keys = [layer.keys.float().cpu().numpy() for layer in self.layers]  # [B, Hkv, T, D] each
            return np.stack([
                np.stack([scorer.head_scores(i, k[b], round_start) for i, k in enumerate(keys)])
                for b in range(keys[0].shape[0])
            ])
        rq = scorer.round_queries(round_start)
        score = score_keys_torch
        if kernels.available(self.layers[0].keys.device):
            score = _score_keys_triton
        scores = [score(layer.keys, rq.virtual_query[i], rq.magnitude_weight[i], scorer.pairing)
                  for i, layer in enumerate(self.layers)]
        return torch.stack(scores, dim=1).cpu().numpy()  # one copy to the host


def score_keys_torch(keys: torch.Tensor, virtual_query: np.ndarray, magnitude_weight: np.ndarray,
                     pairing: str = "half") -> torch.Tensor:
    """keys [..., kv_heads, T, D] → scores [..., heads, T] (float32), the torch form of
    TriAttentionScorer.head_scores (any leading dimensions, e.g. the batch)."""
    heads, dim = virtual_query.shape
    group = heads // keys.shape[-3]
    k = keys.float().repeat_interleave(group, dim=-3)  # [..., H, T, D]
    vq = torch.as_tensor(virtual_query, device=k.device, dtype=torch.float32)
    w = torch.as_tensor(magnitude_weight, device=k.device, dtype=torch.float32)
    if pairing == "half":
        re, im = k[..., : dim // 2], k[..., dim // 2:]
    else:
        re, im = k[..., 0::2], k[..., 1::2]
    trig = torch.einsum("...htd,hd->...ht", k, vq)
    magnitude = torch.einsum("...htf,hf->...ht", torch.sqrt(re * re + im * im), w)
    return trig + magnitude


def _score_keys_triton(keys: torch.Tensor, virtual_query: np.ndarray, magnitude_weight: np.ndarray,
                       pairing: str = "half") -> torch.Tensor:
    return kernels.score_keys(keys, torch.from_numpy(virtual_query), torch.from_numpy(magnitude_weight), pairing)
