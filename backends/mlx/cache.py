"""The TriAttention KV cache for mlx-lm models: one layer's K/V whose slots can be compacted, following mlx-lm's cache
protocol (update_and_fetch, state / meta_state, offset, make_mask, trim, nbytes, to_quantized).

`offset` stays the absolute RoPE position of the next token (mlx-lm's attention rotates the new queries and keys by
it), while the buffer holds only the kept slots, at their original positions; nothing is re-rotated. New tokens are
appended as the last slots, so every stored slot precedes them: the bottom-right-aligned "causal" mask of
mx.fast.scaled_dot_product_attention stays right after compaction, and array masks are built from the stored
length, not from offset.

Two ways to drive it:
- MLXRunner (engine.py) compacts its caches when the shared generation loop (engine.Session) says so;
- make_prompt_cache(...) attaches a CacheCompressor that runs the rounds from inside update_and_fetch, so mlx-lm's
  own generate_step / stream_generate, which builds step n+1 before step n has been read, stays correct.

Quantized storage (mlx-lm's QuantizedKVCache layout: (packed, scales, biases) per K and V) composes with
compaction: the three parts share the slot axis, so they are gathered alike; keys are dequantized to be scored.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import _BaseCache

from ...compression import CompressionState, RoundRecord
from ...methods import KeyScorer, make_scorer
from .methods import check_scorer, layer_head_scores


def _map(fn, x):
    """Apply fn to an array, or to each part of a quantized (packed, scales, biases) tuple."""
    return tuple(fn(p) for p in x) if isinstance(x, tuple) else fn(x)


def _parts(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


class TriAttentionKVCache(_BaseCache):
    """One layer's cache: buffers [B, kv_heads, slots, D] of which the first `length` slots are stored tokens.

    Quantized when it has a `bits` attribute: mlx-lm's attention checks hasattr(cache, "bits") to pick its
    quantized path, so the attribute exists only then."""

    step = 256

    def __init__(self, layer: int = 0, compressor: "CacheCompressor | None" = None, bits: int | None = None,
                 group_size: int = 64, capacity: int | None = None):
        """capacity: the most slots it will hold (B + N under compression), so the buffer never grows past it."""
        self.layer = layer
        self.compressor = compressor
        self.capacity = capacity
        self.keys = None
        self.values = None
        self.length = 0  # stored slots
        self.offset = 0  # absolute position of the next token (RoPE)
        if bits is not None:
            self.bits, self.group_size = bits, group_size

    @property
    def quantized(self) -> bool:
        return hasattr(self, "bits")

    # -- mlx-lm's protocol --
    def update_and_fetch(self, keys: mx.array, values: mx.array):
        n = keys.shape[2]
        if self.compressor is not None:
            self.compressor.before_update(self.layer, n)  # a due round runs first, on what is stored
        if self.quantized:
            keys = tuple(mx.quantize(keys, group_size=self.group_size, bits=self.bits))
            values = tuple(mx.quantize(values, group_size=self.group_size, bits=self.bits))
        self._append(keys, values)
        self.offset += n
        return self._fetch(self.keys), self._fetch(self.values)

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        """The mask of N new tokens over the slots they will see (the stored slots after a due round, then
        themselves)."""
        if window_size is not None:
            raise ValueError("sliding-window attention cannot run on a TriAttention cache: slots are not a "
                             "contiguous run of positions")
        if N == 1:
            return None
        if return_array:
            stored = self.compressor.stored_before_append(N) if self.compressor else self.length
            return create_causal_mask(N, stored)
        return "causal"

    @property
    def state(self):
        if self.keys is None:
            return []
        return self._fetch(self.keys), self._fetch(self.values)

    @state.setter
    def state(self, v):
        if not v:
            self.keys = self.values = None
            self.length = 0
            return
        self.keys, self.values = v
        self.length = _parts(self.keys)[0].shape[2]

    @property
    def meta_state(self):
        bits = str(self.bits) if self.quantized else ""
        return str(self.offset), str(self.layer), bits, str(getattr(self, "group_size", 64))

    @meta_state.setter
    def meta_state(self, v):
        offset, layer, bits, group_size = v
        self.offset, self.layer = int(offset), int(layer)
        if bits:
            self.bits, self.group_size = int(bits), int(group_size)

    @classmethod
    def from_state(cls, state, meta_state=None):
        """A cache holding these K/V (without a compressor: a restored cache is compacted by its new owner)."""
        obj = cls()
        if meta_state is not None:
            obj.meta_state = meta_state
        obj.state = state
        if meta_state is None:
            obj.offset = obj.length
        return obj

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the newest n tokens (fewer if a round already dropped some of them); returns how many."""
        n = min(n, self.length)
        if self.compressor is not None:
            n = self.compressor.trim(self.layer, n)
        self.length -= n
        self.offset -= n
        return n

    def size(self) -> int:
        return self.length

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        """Bytes of the stored K/V (the retained tokens)."""
        if self.keys is None:
            return 0
        return sum(p.nbytes // p.shape[2] * self.length for p in _parts(self.keys) + _parts(self.values))

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "TriAttentionKVCache":
        """Switch this cache to quantized storage in place and return it (mlx-lm's kv_bits path replaces the cache
        by the result, and the compressor keeps its reference). A quantized cache returns itself."""
        if self.quantized:
            return self
        if self.keys is not None:
            self.keys = tuple(mx.quantize(self._fetch(self.keys), group_size=group_size, bits=bits))
            self.values = tuple(mx.quantize(self._fetch(self.values), group_size=group_size, bits=bits))
        self.bits, self.group_size = bits, group_size
        return self

    # -- what compression needs --
    def scoring_keys(self) -> mx.array:
        """The stored keys [B, kv_heads, length, D] as floats (dequantized when stored quantized)."""
        keys = self._fetch(self.keys)
        if self.quantized:
            return mx.dequantize(*keys, group_size=self.group_size, bits=self.bits)
        return keys

    def compact(self, keep: mx.array) -> None:
        """Keep slots keep[row, kv_head, :] ([B, kv_heads, K], ascending); drop the rest."""
        idx = keep.astype(mx.int32)[..., None]
        self.keys = _map(lambda p: mx.take_along_axis(p[..., :self.length, :], idx, axis=2), self.keys)
        self.values = _map(lambda p: mx.take_along_axis(p[..., :self.length, :], idx, axis=2), self.values)
        self.length = keep.shape[-1]

    def select_rows(self, rows: mx.array) -> None:
        """Keep only these batch rows, in this order."""
        if self.keys is not None:
            self.keys = _map(lambda p: p[rows], self.keys)
            self.values = _map(lambda p: p[rows], self.values)

    # -- storage --
    def _fetch(self, x):
        return _map(lambda p: p[..., :self.length, :] if self.length < p.shape[2] else p, x)

    def _append(self, keys, values) -> None:
        prev, n = self.length, _parts(keys)[0].shape[2]
        if self.keys is None or prev + n > _parts(self.keys)[0].shape[2]:
            size = (prev + n + self.step - 1) // self.step * self.step
            if self.capacity is not None:  # never allocate more than the policy's B + N slots
                size = min(size, max(self.capacity, prev + n))
            self.keys = self._grow(self.keys, keys, size)
            self.values = self._grow(self.values, values, size)
        for buffer, new in zip(_parts(self.keys) + _parts(self.values), _parts(keys) + _parts(values)):
            buffer[..., prev:prev + n, :] = new
        self.length = prev + n

    def _grow(self, buffer, like, size: int):
        """A buffer of `size` slots holding the stored ones, shaped and typed like the incoming `like`."""
        def grow(old, new):
            b, h, _, d = new.shape
            if old is None:
                return mx.zeros((b, h, size, d), dtype=new.dtype)
            fresh = mx.zeros((b, h, size - self.length, d), dtype=new.dtype)
            return mx.concatenate([old[..., :self.length, :], fresh], axis=2)

        if buffer is None:
            return _map(lambda new: grow(None, new), like)
        if isinstance(like, tuple):
            return tuple(grow(old, new) for old, new in zip(buffer, like))
        return grow(buffer, like)


class CacheCompressor:
    """One sequence's TriAttention rounds for a list of per-layer caches, run from inside update_and_fetch.

    A round is due when the stored slots exceed the budget and the incoming tokens would take them past B + N; it
    runs at the start of layer 0's update_and_fetch, when every layer holds the same tokens, and compacts every
    layer at once (the per_head and global modes choose across layers). With prefill chunks of at most N tokens
    the cache never holds more than B + N; with prefill_step_size=N and B a multiple of N the rounds fall on the
    same steps as engine.Session's. Batch of one (mlx-lm's generate_step)."""

    def __init__(self, state: CompressionState, scorer: KeyScorer):
        self.state = state
        self.scorer = scorer
        self.caches: list[TriAttentionKVCache] = []
        self.records: list[RoundRecord] = []

    def _due(self, n: int) -> bool:
        stored, policy = self.state.retained, self.state.policy
        return stored > policy.budget and stored + n > policy.capacity

    def stored_before_append(self, n: int) -> int:
        """Slots the next n tokens will see besides themselves (after the round that is due, if any)."""
        return min(self.state.policy.budget, self.state.retained) if self._due(n) else self.state.retained

    def before_update(self, layer: int, n: int) -> None:
        if layer != 0:
            return
        if self._due(n):
            self.compress()
        self.state.appended(n)

    def compress(self) -> RoundRecord:
        scores = layer_head_scores([c.scoring_keys() for c in self.caches], self.scorer, self.state.round_start)
        keep, record = self.state.plan(scores[0])
        keep = mx.array(keep[None].astype(np.int32))  # [1, layers, kv_heads, K]
        for i, cache in enumerate(self.caches):
            cache.compact(keep[:, i])
        self.records.append(record)
        return record

    def trim(self, layer: int, n: int) -> int:
        """How many of the newest n tokens every row still holds (the same answer for every layer); the last layer
        also drops them from the positions."""
        state = self.state
        nxt, stored = state.next_position, state.retained
        expected = np.arange(nxt - stored, nxt)
        held = (state.positions == expected).all(axis=(0, 1))  # [T]: slot j holds position nxt - stored + j
        newest = stored - (np.flatnonzero(~held).max() + 1 if not held.all() else 0)
        n = min(n, newest)
        if layer == len(self.caches) - 1 and n > 0:
            state.positions = state.positions[..., :stored - n]
            state._next -= n  # CompressionState has no trim; its next position follows the positions it tracks
        return n


def make_prompt_cache(shape, compression, prompt_len: int = 0, kv_bits: int | None = None,
                      kv_group_size: int = 64) -> list[TriAttentionKVCache]:
    """A self-compressing cache for mlx-lm's generate_step / stream_generate (pass prefill_step_size ≤ N).

    shape: the model's rope.ModelShape; compression: engine.CompressionSettings (policy None: plain caches that only
    grow). prompt_len matters only with protect_prefill. The list's caches share one CacheCompressor
    (caches[0].compressor: its state has the positions, rounds and peak; its records the rounds)."""
    if not compression.enabled:
        return [TriAttentionKVCache(i, None, kv_bits, kv_group_size) for i in range(shape.num_layers)]
    scorer = check_scorer(make_scorer(compression, shape))
    state = CompressionState(compression.policy, scorer, shape.num_layers, shape.num_kv_heads,
                             compression.group_aggregation)
    state.prompt_len = prompt_len
    compressor = CacheCompressor(state, scorer)
    compressor.caches = [TriAttentionKVCache(i, compressor, kv_bits, kv_group_size, compression.policy.capacity)
                         for i in range(shape.num_layers)]
    return compressor.caches
