"""Backend-independent bookkeeping of one sequence's compressed KV cache.

The backend stores K/V; this tracks the original position of every cache slot of every (layer, KV head), runs the
scorer and the budget policy when a round is due, and hands back which slots to keep. Positions stay original.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .policy import BudgetPolicy

if TYPE_CHECKING:
    from .methods import KeyScorer  # anything with a group_size: TriAttentionScorer or a baseline


@dataclass
class RoundRecord:
    """One compression round: when it happened and which original positions each choosing row kept."""

    round: int
    step: int  # tokens processed (prompt + generated) when the round ran
    kept: list[tuple[int | None, int | None, list[int]]] = field(default_factory=list)  # (layer, kv_head, positions)

    def trace_lines(self) -> list[dict]:
        return [
            {"round": self.round, "step": self.step, "layer": layer, "kv_head": head, "kept_positions": positions}
            for layer, head, positions in self.kept
        ]


class CompressionState:
    """Slot positions [layers, kv_heads, T] of one sequence, plus the counters users see."""

    def __init__(self, policy: BudgetPolicy, scorer: KeyScorer, num_layers: int, num_kv_heads: int,
                 group_aggregation: str = "max"):
        self.policy = policy
        self.scorer = scorer
        self.group_aggregation = group_aggregation
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        # Slot positions, growing by doubling. Where every layer keeps the same slots (per_head and global
        # pruning) one layer's row is stored and read back broadcast: a round's bookkeeping stays O(H · T).
        stored_layers = num_layers if policy.pruning_mode == "per_layer_head" else 1
        self._slots = np.zeros((stored_layers, num_kv_heads, 256), dtype=np.int64)
        self._len = 0
        self.prompt_len = 0
        self.rounds = 0
        self.peak_retained = 0
        self._next = 0

    def copy(self) -> "CompressionState":
        """An independent copy (for cache snapshots): the same policy and scorer, its own slot positions."""
        other = copy.copy(self)
        other._slots = self._slots.copy()
        return other

    @property
    def next_position(self) -> int:
        """Tokens seen so far: the logical length, and the RoPE position of the next token."""
        return self._next

    @property
    def positions(self) -> np.ndarray:
        """Original position of every cache slot: [layers, kv_heads, T] (a read-only view)."""
        view = self._slots[..., : self._len]
        return np.broadcast_to(view, (self.num_layers,) + view.shape[1:])

    @positions.setter
    def positions(self, value: np.ndarray) -> None:
        self._len = 0
        self._reserve(value.shape[-1])
        self._slots[..., : value.shape[-1]] = value[: self._slots.shape[0]]  # layers agree where one is stored
        self._len = value.shape[-1]

    @property
    def retained(self) -> int:
        return self._len

    def _reserve(self, size: int) -> None:
        if size > self._slots.shape[-1]:
            grown = np.zeros(self._slots.shape[:-1] + (max(size, 2 * self._slots.shape[-1]),), dtype=np.int64)
            grown[..., : self._len] = self._slots[..., : self._len]
            self._slots = grown

    def appended(self, count: int) -> None:
        """Record that the backend appended `count` new tokens to every row of its cache (amortised O(count))."""
        self._reserve(self._len + count)
        self._slots[..., self._len: self._len + count] = np.arange(self._next, self._next + count, dtype=np.int64)
        self._len += count
        self._next += count
        self.peak_retained = max(self.peak_retained, self.retained)

    def needs_compression(self) -> bool:
        return self.policy.needs_compression(self.retained)

    @property
    def round_start(self) -> int:
        """Tokens seen so far: future queries sit at round_start + offsets (the reference's round start)."""
        return self._next

    def plan(self, head_scores: np.ndarray) -> tuple[np.ndarray, RoundRecord]:
        """Per-query-head scores [layers, heads, T] → slots to keep [layers, kv_heads, B] and the round's record."""
        candidates = self.policy.candidates(self.positions, self.prompt_len)
        rows = self.policy.combine(head_scores, self.scorer.group_size, candidates, self.group_aggregation)
        keep_rows = self.policy.select(rows, self.row_positions(), self.next_position, self.prompt_len)
        return self.apply(keep_rows)

    def apply(self, keep_rows: np.ndarray) -> tuple[np.ndarray, RoundRecord]:
        """Record a round whose choosing rows keep slots keep_rows [rows, B] (from plan, or from a backend's fast
        form of the same policy); returns the slots to keep per (layer, KV head) and the round's record."""
        return self._expand(keep_rows), self.record_round(keep_rows)

    def record_round(self, keep_rows: np.ndarray) -> RoundRecord:
        """apply without the per-(layer, KV head) slot list, for backends that compact from keep_rows themselves.
        The rows' kept positions are gathered once and broadcast to every slot row they decide (in per_head and
        global modes all layers hold the same positions): a round's bookkeeping is O(rows · B), not O(L · H · T)."""
        kept = np.take_along_axis(self.row_positions(), keep_rows, axis=-1)  # [rows, B]
        record = RoundRecord(self.rounds + 1, self._next, self._record_rows(kept))
        shape = (self.num_layers, self.num_kv_heads, kept.shape[-1])
        self.positions = kept.reshape(shape) if self.policy.pruning_mode == "per_layer_head" else \
            np.broadcast_to(kept[None], shape)
        self.rounds += 1
        return record

    def row_positions(self) -> np.ndarray:
        """Positions [rows, T] of the slots each choosing row of the pruning mode sees."""
        mode = self.policy.pruning_mode
        if mode == "per_layer_head":
            return self.positions.reshape(-1, self.retained)
        if mode == "per_head":
            return self.positions[0]
        return self.positions[0, :1]

    def _expand(self, keep_rows: np.ndarray) -> np.ndarray:
        shape = (self.num_layers, self.num_kv_heads, keep_rows.shape[-1])
        if self.policy.pruning_mode == "per_layer_head":
            return keep_rows.reshape(shape)
        return np.broadcast_to(keep_rows, shape).copy()  # per_head: [H, B]; global: [1, B]

    def _record_rows(self, kept: np.ndarray) -> list:
        mode = self.policy.pruning_mode
        out = []
        for r, positions in enumerate(kept.tolist()):
            if mode == "per_layer_head":
                out.append((r // self.num_kv_heads, r % self.num_kv_heads, positions))
            elif mode == "per_head":
                out.append((None, r, positions))
            else:
                out.append((None, None, positions))
        return out
