"""Prefix reuse: snapshots of request caches at cut points of their prompts, and the longest snapshot a new prompt
starts with.

Agents re-send a long shared beginning (system prompt and tools, earlier turns) and change the end: OpenClaw adds
a transient context message to every turn and never replays it, rewrites history on memory flushes and compaction,
and chat templates re-render earlier replies (Qwen3 drops their reasoning). So a new request is matched on token ids
only: it starts from the longest kept snapshot whose ids are a proper prefix of its prompt (at least one token is
left to prefill, for the first logits), and prefills the rest.

Exactness. Prefill runs the prompt in chunks; a request stops its prefill at cut points, which are a function of the
token ids alone (after every turn-end token such as <|im_end|>, and every SNAPSHOT_STRIDE tokens). Two prompts that
agree up to a cut are therefore cut the same way up to it, so a session restored from a snapshot at that cut holds
exactly the cache (same K/V, same positions, same compression rounds) that the uninterrupted prefill holds there,
and gives the same greedy tokens as the same request sent cold.

What is kept: chat requests snapshot at their message boundaries (after the system prompt + tools, and after each
complete message); text completions at their last cut. A snapshot holds the retained K/V, at most B + N slots per
layer and KV head with compression, so it is small next to the prompt it stands for: for Qwen3-8B (36 layers, 8 KV
heads of 128 dims, 16-bit K and V) at B = 2048, N = 128 it is at most 36 × 8 × 128 × 2 × 2 × 2176 bytes = 306 MiB,
whatever the prompt's length. Snapshots are bounded by count and by bytes (--conversation-memory), least recently
used first; a match refreshes every snapshot that is a prefix of the prompt (the system prompt stays).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

SNAPSHOT_STRIDE = 256  # a cut every so many tokens: text completions without turns have one to snapshot at


def cut_points(ids: list[int], turn_ends: set[int]) -> list[int]:
    """Where prefill stops (0 < cut < len(ids)): after each turn-end token, and at multiples of SNAPSHOT_STRIDE."""
    cuts = {i + 1 for i, t in enumerate(ids) if t in turn_ends}
    cuts.update(range(SNAPSHOT_STRIDE, len(ids), SNAPSHOT_STRIDE))
    return sorted(c for c in cuts if 0 < c < len(ids))


def snapshot_points(ids: list[int], turn_ends: set[int], chat: bool) -> list[int]:
    """The cuts worth a snapshot: a chat's message boundaries (after turn-end tokens); a text completion's last cut."""
    if chat:
        return [i + 1 for i, t in enumerate(ids[:-1]) if t in turn_ends]
    cuts = cut_points(ids, turn_ends)
    return cuts[-1:]


@dataclass
class Entry:
    ids: tuple[int, ...]  # the prompt tokens the snapshot stands for
    snapshot: object  # engine.Snapshot
    kv_bytes: int


@dataclass
class Match:
    snapshot: object  # engine.Snapshot to restore
    cached: int  # prompt tokens it covers (not prefilled again)


class SnapshotStore:
    """Kept snapshots by their token ids, least recently used first; thread-safe (the worker writes, metrics read)."""

    def __init__(self, max_snapshots: int, max_bytes: int):
        self.max_snapshots = max_snapshots
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[int, ...], Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_snapshots > 0 and self.max_bytes > 0

    def has(self, ids: list[int]) -> bool:
        """Whether these ids are kept already (refreshing them): no need to copy the cache again."""
        key = tuple(ids)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return True
            return False

    def put(self, ids: list[int], snapshot, kv_bytes: int) -> None:
        if not self.enabled or kv_bytes > self.max_bytes:
            return
        key = tuple(ids)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.kv_bytes
            self._items[key] = Entry(key, snapshot, kv_bytes)
            self._bytes += kv_bytes
            while len(self._items) > self.max_snapshots or self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.kv_bytes

    def match(self, prompt: list[int]) -> Match | None:
        """The longest kept snapshot whose ids are a proper prefix of the prompt; every kept prefix of the prompt is
        marked as used."""
        key = tuple(prompt)
        with self._lock:
            hits = [e for k, e in self._items.items() if len(k) < len(key) and key[:len(k)] == k]
            for e in sorted(hits, key=lambda e: len(e.ids)):  # the longest ends up most recent
                self._items.move_to_end(e.ids)
        if not hits:
            return None
        best = max(hits, key=lambda e: len(e.ids))
        return Match(best.snapshot, len(best.ids))

    def snapshots(self) -> list:
        with self._lock:
            return [e.snapshot for e in self._items.values()]

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
