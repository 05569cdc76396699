"""Which methods the MLX backend scores, and their per-query-head scores [B, layers, heads, T].

TriAttention (scorer.py) and the StreamingLLM baseline, which needs nothing but the slot order. SnapKV, R-KV and H2O
need the model's queries or attention at run time, which mlx-lm's attention does not expose; they are torch-only.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ...errors import UserError
from ...methods import BaselineScorer, KeyScorer, streaming_slot_scores
from . import scorer as mlx_scorer

SUPPORTED = ("triattention", "streaming")


def check_scorer(scorer: KeyScorer | None) -> KeyScorer | None:
    """The scorer itself, or a UserError for a baseline this backend cannot compute."""
    if isinstance(scorer, BaselineScorer) and scorer.method not in SUPPORTED:
        raise UserError(f"--method {scorer.method} is not available with the mlx backend "
                        f"(use {' or '.join(SUPPORTED)}, or --backend torch)")
    return scorer


def streaming_scores(layer_keys: list[mx.array], scorer: BaselineScorer) -> np.ndarray:
    """StreamingLLM: its sinks and the newest tokens (methods.streaming_slot_scores)."""
    batch, kv_heads, t, _ = layer_keys[0].shape
    slots = streaming_slot_scores(t)
    return np.broadcast_to(slots, (batch, len(layer_keys), kv_heads * scorer.group_size, t)).copy()


def layer_head_scores(layer_keys: list[mx.array], scorer: KeyScorer, round_start: int) -> np.ndarray:
    """Scores [B, layers, heads, T] of every layer's cached keys [B, kv_heads, T, D], on the host."""
    if isinstance(scorer, BaselineScorer):
        return streaming_scores(layer_keys, check_scorer(scorer))
    return mlx_scorer.head_scores(layer_keys, scorer, round_start)
