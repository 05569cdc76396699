"""The budget policy, written once: when to compress, and which cached positions each cache row keeps.

Budget B, divide length N: the cache grows to B + N, then is cut back to B. The S sink positions (the first
tokens), the W most recent tokens and, optionally, the prompt are always kept; the rest of the budget goes to the
best-scored keys. Ties go to the earlier position, so every backend keeps the same set for the same scores.

Pruning modes say who chooses:
- per_layer_head: every (layer, KV head) keeps its own positions;
- per_head: each KV head keeps one set shared by all layers (scores averaged over layers);
- global: one set for the whole cache (what llama.cpp can do, since its cells hold all layers and heads).
Scores are z-normalised per (layer, KV head) before they are averaged across rows, since their scales differ.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .errors import UserError

PRUNING_MODES = ("per_layer_head", "per_head", "global")
AUTO = "auto"  # the backend's preferred mode (per_head; global on llama.cpp), resolved when a Session starts


@dataclass(frozen=True)
class BudgetPolicy:
    budget: int = 2048
    divide_length: int = 128
    window: int = 128
    sinks: int = 4
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
        """How many prompt tokens to append now so that the cache never exceeds B + N (at most N)."""
        return max(1, min(self.divide_length, self.capacity - cache_len))

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

    def combine(self, kv_scores: np.ndarray) -> np.ndarray:
        """[layers, kv_heads, T] scores → [rows, T], one row per independent choice of the pruning mode."""
        layers, kv_heads, t = kv_scores.shape
        if self.pruning_mode == "per_layer_head":
            return kv_scores.reshape(layers * kv_heads, t)
        z = _zscore(kv_scores.astype(np.float64))
        if self.pruning_mode == "per_head":
            return z.mean(axis=0)
        return z.reshape(-1, t).mean(axis=0, keepdims=True)

    def select(self, scores: np.ndarray, positions: np.ndarray, last_position: int, prompt_len: int) -> np.ndarray:
        """Indices [rows, B] into each row's cache slots to keep, in ascending position order.

        scores, positions: [rows, T] with T ≥ B. last_position: the position of the newest cached token.
        """
        rows, t = scores.shape
        keep = min(self.budget, t)
        protected = (positions < self.sinks) | (positions > last_position - self.window)
        if self.protects_prompt(prompt_len):
            protected |= positions < prompt_len
        key = np.where(np.isnan(scores), -np.inf, scores.astype(np.float64))
        key = np.where(protected, np.inf, key)
        out = np.empty((rows, keep), dtype=np.int64)
        for r in range(rows):
            order = np.lexsort((positions[r], -key[r]))[:keep]  # best score first, earlier position on ties
            out[r] = order[np.argsort(positions[r][order], kind="stable")]
        return out


def _zscore(x: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    std = x.std(axis=-1, keepdims=True)
    return (x - mean) / np.maximum(std, 1e-6)
