"""The budget policy, written once: when to compress, and which cached positions each cache row keeps.

Budget B, divide length N: the cache grows to B + N, then is cut back to B. The W most recent tokens, optionally
the prompt, and S sink positions (the first tokens; an extension, 0 by default as in the reference) are always kept;
the rest of the budget goes to the best-scored keys. Ties go to the earlier position, so every backend keeps the same
set for the same scores.

The order is the reference implementation's (WeianMao/triattention, its HF path and vLLM plugin):
1. z-score each query head's scores over the candidate tokens (population std, clamped at 1e-6); with the prompt
   protected, the candidates are the tokens after the prompt;
2. aggregate over each GQA group (max by default) → one score per (layer, KV head);
3. combine for the pruning mode:
   - per_layer_head: every (layer, KV head) keeps its own positions;
   - per_head: each KV head keeps one set shared by all layers, by the mean over layers;
   - global: one set for the whole cache, by the max over every layer and head: the reference's union-based shared
     selection (each head's top-B, then the best B of the union by that max) keeps exactly these, ties aside. It is
     what llama.cpp can do, since its cells hold all layers and heads;
4. top-B, with the window, sinks and protected prompt forced in.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .errors import UserError

PRUNING_MODES = ("per_layer_head", "per_head", "global")
AUTO = "auto"  # the backend's preferred mode (per_head; global on llama.cpp), resolved when a Session starts
PREFILL_TOKENS = 512  # prompt tokens per forward at most (bounds activation memory), with or without compression


@dataclass(frozen=True)
class BudgetPolicy:
    budget: int = 2048
    divide_length: int = 128
    window: int = 128
    sinks: int = 0
    protect_prefill: bool = False
    pruning_mode: str = "per_head"

    def __post_init__(self):
        if self.pruning_mode not in PRUNING_MODES + (AUTO,):
            raise UserError(f"unknown pruning mode {self.pruning_mode!r} (choose from {AUTO}, {', '.join(PRUNING_MODES)})")
        if self.divide_length < 1:
            raise UserError(f"divide length must be at least 1 (got {self.divide_length})")
        if self.window < 0 or self.sinks < 0:
            raise UserError("window and sinks cannot be negative")
        if self.budget <= self.window + self.sinks:
            raise UserError(
                f"budget {self.budget} must be larger than window + sinks ({self.window} + {self.sinks}), "
                "or nothing is left for the scorer to choose"
            )

    @property
    def capacity(self) -> int:
        """The most KV tokens a cache row ever holds: B + N."""
        return self.budget + self.divide_length

    def needs_compression(self, cache_len: int) -> bool:
        return cache_len >= self.capacity

    def prefill_chunk(self, cache_len: int) -> int:
        """How many prompt tokens to append now: as many as the cache holds before its next round (it never exceeds
        B + N, and the rounds fall where token-by-token feeding puts them: when the cache reaches B + N), at most
        PREFILL_TOKENS. Before the first round that is up to B + N tokens, so a prompt shorter than the budget is
        a few forwards, not one per N tokens (which made a server's prefill several times slower than full KV's)."""
        return max(1, min(PREFILL_TOKENS, self.capacity - cache_len))

    def protects_prompt(self, prompt_len: int) -> bool:
        """Prompt protection holds only while the prompt and the window fit in the budget; else warn and score it."""
        if not self.protect_prefill:
            return False
        if prompt_len + self.window > self.budget:
            warnings.warn(
                f"prompt of {prompt_len} tokens + window {self.window} exceeds the budget {self.budget}: "
                "the prompt is compressed like other tokens",
                stacklevel=2,
            )
            return False
        return True

    def rows(self, num_layers: int, num_kv_heads: int) -> int:
        """How many independent keep sets a round produces."""
        return {"per_layer_head": num_layers * num_kv_heads, "per_head": num_kv_heads, "global": 1}[self.pruning_mode]

    def candidates(self, positions: np.ndarray, prompt_len: int) -> np.ndarray:
        """Which slots each query head's z-score runs over: all of them, or those after a protected prompt."""
        if self.protects_prompt(prompt_len):
            return positions >= prompt_len
        return np.ones(positions.shape, dtype=bool)

    def combine(self, head_scores: np.ndarray, group_size: int, candidates: np.ndarray,
                aggregation: str = "max") -> np.ndarray:
        """Per-query-head scores [layers, heads, T] → [rows, T], one row per independent choice of the pruning mode.

        candidates: [layers, kv_heads, T] (or broadcastable) slots each KV head's query heads are normalised over.
        """
        layers, heads, t = head_scores.shape
        mask = np.broadcast_to(candidates, (layers, heads // group_size, t))
        mask = np.repeat(mask, group_size, axis=1)  # query head h uses the slots of its KV head h // group_size
        z = _zscore(head_scores.astype(np.float64), mask)
        grouped = z.reshape(layers, heads // group_size, group_size, t)
        kv = grouped.max(axis=2) if aggregation == "max" else grouped.mean(axis=2)
        if self.pruning_mode == "per_layer_head":
            return kv.reshape(-1, t)
        if self.pruning_mode == "per_head":
            return kv.mean(axis=0)
        return kv.reshape(-1, t).max(axis=0, keepdims=True)

    def select(self, scores: np.ndarray, positions: np.ndarray, next_position: int, prompt_len: int) -> np.ndarray:
        """Indices [rows, B] into each row's cache slots to keep, in ascending position order.

        scores, positions: [rows, T] with T ≥ B. next_position: tokens seen so far (the newest cached token is
        next_position − 1, and the window is the W positions before next_position).
        """
        rows, t = scores.shape
        keep = min(self.budget, t)
        key = np.where(np.isnan(scores), -np.inf, scores.astype(np.float64))
        key = np.where(self.protected(positions, next_position, prompt_len), np.inf, key)
        out = np.empty((rows, keep), dtype=np.int64)
        for r in range(rows):
            order = np.lexsort((positions[r], -key[r]))[:keep]  # best score first, earlier position on ties
            out[r] = order[np.argsort(positions[r][order], kind="stable")]
        return out

    def protected(self, positions: np.ndarray, next_position: int, prompt_len: int) -> np.ndarray:
        """Slots always kept: the recent window, the sinks and (while it fits) the prompt."""
        mask = (positions < self.sinks) | (positions >= next_position - self.window)
        if self.protects_prompt(prompt_len):
            mask |= positions < prompt_len
        return mask


def _zscore(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """z-score along the last axis over the masked entries (population std, clamped at 1e-6, as the reference)."""
    mask = mask & ~np.isnan(x)  # a NaN score is dropped at selection; it must not spoil its head's statistics
    count = np.maximum(mask.sum(axis=-1, keepdims=True), 1)
    mean = np.where(mask, x, 0.0).sum(axis=-1, keepdims=True) / count
    var = np.where(mask, (x - mean) ** 2, 0.0).sum(axis=-1, keepdims=True) / count
    return (x - mean) / np.maximum(np.sqrt(var), 1e-6)
