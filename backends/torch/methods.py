"""The baseline methods (triattn_local.methods.BaselineScorer) in the torch backend: what they record while the model
runs, and their per-query-head scores [layers, heads, T], which the shared GQA grouping and budget policy turn into
the slots to keep.

SnapKV, R-KV and H2O need the model's post-RoPE queries. We get them without touching the model code: the model's
attention implementation is swapped for a registered wrapper ("triattn+sdpa", …) that hands (query, key) to the
recorder passed in forward's kwargs, then calls the original implementation. Without a recorder the wrapper only
calls the original, so other sessions of the same engine are unaffected.

Everything is batched: a runner holds a batch of sequences in lockstep, so every tensor here has a leading batch
dimension [B, …] (the score functions accept any leading dimensions, or none), and row b is sequence b.

The slots of a cache row are in position order, and a forward appends its tokens as the last slots. Every round
keeps the policy's recent window, which is at least the observation window (methods.make_scorer caps it), so the
observed tokens are the last slots of every row too: that is where the causal mask of their queries comes from.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...methods import BaselineScorer, streaming_slot_scores

CAPTURE_PREFIX = "triattn+"
RECORDER_KWARG = "triattn_recorder"


# ---- capture ---------------------------------------------------------------------------------------------------


def enable_capture(model) -> None:
    """Route the model's attention through the capturing wrapper of its implementation (once per model)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = model.config._attn_implementation
    if impl.startswith(CAPTURE_PREFIX):
        return

    def capturing_attention(module, query, key, value, attention_mask, triattn_recorder=None, **kwargs):
        if triattn_recorder is not None:
            triattn_recorder.observe(module.layer_idx, query, key, kwargs.get("scaling") or module.scaling)
        if impl == "eager":  # the model's own eager function (transformers' default for "eager")
            inner = sys.modules[type(module).__module__].eager_attention_forward
        else:
            inner = ALL_ATTENTION_FUNCTIONS[impl]
        return inner(module, query, key, value, attention_mask, **kwargs)

    name = CAPTURE_PREFIX + impl
    AttentionInterface.register(name, capturing_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])  # the same masks as before
    model.config._attn_implementation = name


@dataclass
class RecorderRow:
    """One row of an AttentionRecorder without the batch dimension (for inspection): per layer [H, …] or None."""

    queries: list[torch.Tensor | None]
    received: list[torch.Tensor | None]


class AttentionRecorder:
    """A batch's record for an attention-based baseline: the last obs_window post-RoPE queries of every layer
    (snapkv, rkv), or the attention every cached key has received from every query so far (h2o)."""

    def __init__(self, scorer: BaselineScorer, num_layers: int):
        self.scorer = scorer
        self.num_layers = num_layers
        self.reset()

    def reset(self) -> None:
        self.queries: list[torch.Tensor | None] = [None] * self.num_layers  # [B, H, ≤ obs_window, D]
        self.received: list[torch.Tensor | None] = [None] * self.num_layers  # [B, H, T] float32, one per cache slot
        self.scaling: float | None = None

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """From the attention wrapper: this forward's queries [B, H, n, D] and the whole cache's keys
        [B, Hkv, T, D], the n new tokens last."""
        self.scaling = scaling
        if self.scorer.method == "h2o":
            got = causal_attention(query, key, scaling).sum(dim=-2)  # [B, H, T]
            before = self.received[layer]
            if before is not None:
                got[..., : before.shape[-1]] += before
            self.received[layer] = got
        else:
            before = self.queries[layer]
            q = query if before is None else torch.cat([before, query], dim=-2)
            self.queries[layer] = q[..., -self.scorer.obs_window:, :].clone()  # bounded: no view of a long chunk

    def compact(self, keep: torch.Tensor) -> None:
        """Follow the cache's compaction keep [B, layers, kv_heads, K]: keep the received attention of the kept
        slots (queries are not slots)."""
        for i, got in enumerate(self.received):
            if got is not None:
                idx = keep[:, i].to(got.device).repeat_interleave(self.scorer.group_size, dim=1)  # [B, H, K]
                self.received[i] = torch.gather(got, 2, idx)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Follow the cache when the batch keeps only these rows (indices into the current batch)."""
        self.queries = [None if q is None else q[rows.to(q.device)] for q in self.queries]
        self.received = [None if r is None else r[rows.to(r.device)] for r in self.received]

    def row(self, b: int) -> RecorderRow:
        """Row b's record, without the batch dimension."""
        return RecorderRow([None if q is None else q[b] for q in self.queries],
                           [None if r is None else r[b] for r in self.received])


# ---- scores of one layer ---------------------------------------------------------------------------------------


def causal_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention [..., H, n, T] (float32) of the queries [..., H, n, D] of the last n cached tokens over all
    the cached keys [..., Hkv, T, D]: each query sees the slots up to its own."""
    heads, n, _ = queries.shape[-3:]
    t = keys.shape[-2]
    k = keys.float().repeat_interleave(heads // keys.shape[-3], dim=-3)  # query head h reads KV head h // group
    logits = torch.einsum("...hnd,...htd->...hnt", queries.float(), k) * scaling
    slot = torch.arange(t, device=keys.device)
    own = torch.arange(t - n, t, device=keys.device)
    return logits.masked_fill(slot[None, :] > own[:, None], float("-inf")).softmax(dim=-1)


def max_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """1-D max pooling of [..., T] along the keys, same length (odd kernel): neighbours of an important key count."""
    if kernel <= 1:
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    return F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2).reshape(scores.shape)


def snapkv_scores(queries: torch.Tensor, keys: torch.Tensor, scaling: float, kernel: int = 7) -> torch.Tensor:
    """SnapKV: attention of the observation queries, summed over them, max-pooled along the keys: [..., H, T]."""
    return max_pool(causal_attention(queries, keys, scaling).sum(dim=-2), kernel)


def key_redundancy(keys: torch.Tensor) -> torch.Tensor:
    """R-KV redundancy [..., Hkv, T]: each key's mean cosine similarity to the other keys of its KV head, softmaxed
    over the keys (as R-KV does, so it is on the scale of the attention distribution it is mixed with)."""
    k = F.normalize(keys.float(), dim=-1)
    sim = k @ k.transpose(-1, -2)  # [..., Hkv, T, T]
    t = sim.shape[-1]
    mean_other = (sim.sum(dim=-1) - sim.diagonal(dim1=-2, dim2=-1)) / max(t - 1, 1)
    return mean_other.softmax(dim=-1)


def rkv_scores(queries: torch.Tensor, keys: torch.Tensor, scaling: float, kernel: int = 7,
               lam: float = 0.1) -> torch.Tensor:
    """R-KV: λ·importance − (1 − λ)·redundancy, importance being the observation queries' attention averaged over
    them (a distribution over the keys) and max-pooled: [..., H, T]."""
    importance = max_pool(causal_attention(queries, keys, scaling).mean(dim=-2), kernel)
    redundancy = key_redundancy(keys).repeat_interleave(queries.shape[-3] // keys.shape[-3], dim=-2)
    return lam * importance - (1 - lam) * redundancy


# ---- the registry: one layer's scores [B, H, T] from its keys [B, Hkv, T, D] ----------------------------------


def _snapkv(scorer: BaselineScorer, layer: int, keys: torch.Tensor, recorder: AttentionRecorder) -> torch.Tensor:
    return snapkv_scores(recorder.queries[layer], keys, recorder.scaling, scorer.pool_kernel)


def _rkv(scorer: BaselineScorer, layer: int, keys: torch.Tensor, recorder: AttentionRecorder) -> torch.Tensor:
    return rkv_scores(recorder.queries[layer], keys, recorder.scaling, scorer.pool_kernel, scorer.rkv_lambda)


def _h2o(scorer: BaselineScorer, layer: int, keys: torch.Tensor, recorder: AttentionRecorder) -> torch.Tensor:
    return recorder.received[layer]


def _streaming(scorer: BaselineScorer, layer: int, keys: torch.Tensor, recorder: None) -> torch.Tensor:
    """StreamingLLM: its sinks and the newest tokens (methods.streaming_slot_scores)."""
    batch, kv_heads, t, _ = keys.shape
    slots = torch.from_numpy(streaming_slot_scores(t)).to(keys.device)
    return slots.expand(batch, kv_heads * scorer.group_size, t)


BASELINES = {"snapkv": _snapkv, "rkv": _rkv, "streaming": _streaming, "h2o": _h2o}
RECORDING = ("snapkv", "rkv", "h2o")  # the baselines that need the attention wrapper and a recorder


def baseline_head_scores(scorer: BaselineScorer, cache, recorder: AttentionRecorder | None) -> np.ndarray:
    """Scores [B, layers, heads, T] of every cached key of cache (a TriAttentionCache) for every query head."""
    score = BASELINES[scorer.method]
    scores = [score(scorer, i, layer.keys, recorder).float() for i, layer in enumerate(cache.layers)]
    return torch.stack(scores, dim=1).cpu().numpy()  # one copy to the host
