"""KV-compression methods by name: TriAttention and the baselines it is compared with at equal budgets.

A method only scores the cached keys per query head. The one BudgetPolicy (budget, divide length, sinks, window,
prompt protection, pruning mode, ties to the earlier position) and the one GQA grouping decide what is kept, so two
methods at the same settings differ in their scores alone. TriAttention scores with calibrated query stats
(scorer.py, backend-independent). The baselines score with what the model does at run time (its recent queries, its
attention), so each backend implements them (backends/torch/methods.py); they need no stats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING


import numpy as np

from .errors import UserError
from .scorer import TriAttentionScorer, geometric_offsets

if TYPE_CHECKING:
    from .engine import CompressionSettings
    from .rope import ModelShape

METHODS = ("triattention", "snapkv", "rkv", "streaming", "h2o")
DEFAULT_METHOD = "triattention"
DEFAULT_OBS_WINDOW = 32


def check_method(name: str) -> str:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
    return name


@dataclass(frozen=True)
class BaselineScorer:
    """A baseline method and its settings; the backend's runner computes its per-query-head scores.

    - snapkv: attention of the last obs_window queries over the cached keys, summed over those queries, max-pooled
      along the keys (SnapKV);
    - rkv: λ·importance − (1 − λ)·redundancy (R-KV): importance is that attention averaged over the observation
      queries and max-pooled; redundancy is the softmax over keys of each key's mean cosine similarity to the other
      keys of its KV head, so near-duplicates score lower;
    - streaming: the key's place in its row, i.e. its position order, with its own 4 attention sinks first
      (StreamingLLM: sinks + the newest tokens, whatever the policy's --sink);
    - h2o: attention each key has received from every query so far (H2O heavy hitters).
    """

    method: str
    group_size: int  # query heads per KV head
    obs_window: int = DEFAULT_OBS_WINDOW
    pool_kernel: int = 7
    rkv_lambda: float = 0.1  # the R-KV paper's λ


KeyScorer = TriAttentionScorer | BaselineScorer
STREAMING_SINKS = 4  # StreamingLLM's attention sinks: part of the method, not of the shared policy


def streaming_slot_scores(slots: int) -> np.ndarray:
    """StreamingLLM's score of each cache slot [T]: the slot index (slots are in position order, so the newest win),
    and the first STREAMING_SINKS slots, which hold the first positions from the start, above all."""
    scores = np.arange(slots, dtype=np.float32)
    scores[:STREAMING_SINKS] += slots + STREAMING_SINKS
    return scores


def make_scorer(settings: "CompressionSettings", shape: "ModelShape") -> KeyScorer:
    """The scorer of settings.method. The observation window is capped by the policy's recent window, so the
    observed tokens are always still cached (at least one query is observed)."""
    if settings.method == "triattention":
        if settings.stats is None:
            raise ValueError("compression needs stats")
        return TriAttentionScorer(settings.stats, offsets=geometric_offsets(settings.max_offset),
                                  offset_aggregation=settings.offset_aggregation)
    obs = max(1, min(settings.obs_window, settings.policy.window))
    return BaselineScorer(check_method(settings.method), shape.num_heads // shape.num_kv_heads, obs_window=obs)
