"""Measure pre-RoPE query statistics of an mlx-lm model on calibration text (the shared stats format).

As in the torch backend: the query after q_norm where the model has one (Qwen3), else straight from q_proj. mlx-lm
models have no forward hooks, so for the run the module that produces the query is wrapped in a recording module
(and put back afterwards). MLX is lazy: the per-chunk sums are evaluated with the cache, and the logits, which
nothing reads, are never computed.
"""

from __future__ import annotations


import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from ...errors import UserError
from ...rope import ModelShape
from ...calibration import calibration_progress, calibration_token_ids, stats_from_sums
from ...stats.format import QueryStats

SOURCE = "triattn calibrate"


class _QuerySums:
    """Float64 running sums of q_f and |q_f| per (head, f) for one layer (host side)."""

    def __init__(self, num_heads: int, head_dim: int):
        self.num_heads, self.head_dim = num_heads, head_dim
        self.totals = np.zeros((3, num_heads, head_dim // 2))  # real, imag, magnitude
        self.pending: list[mx.array] = []  # this chunk's sums [3, H, F], not yet evaluated
        self.tokens = 0

    def observe(self, q: mx.array) -> None:
        q = q.reshape(-1, self.num_heads, self.head_dim).astype(mx.float32)  # from [B,T,H,D] or [B,T,H*D]
        d = self.head_dim // 2
        re, im = q[..., :d], q[..., d:]  # 'half' pairing, as mlx-lm's non-traditional RoPE
        self.pending.append(mx.stack([re.sum(0), im.sum(0), mx.sqrt(re * re + im * im).sum(0)]))
        self.tokens += q.shape[0]

    def fold(self) -> None:
        """Move the evaluated chunk sums into the float64 totals."""
        for sums in self.pending:
            self.totals += np.array(sums).astype(np.float64)
        self.pending = []


class _Recording(nn.Module):
    """Wraps the module whose output is the pre-RoPE query; returns that output unchanged."""

    def __init__(self, inner: nn.Module, sums: _QuerySums):
        super().__init__()
        self.inner = inner
        self.sums = sums  # a plain object: not a parameter of the model

    def __call__(self, x):
        q = self.inner(x)
        self.sums.observe(q)
        return q


def _query_attribute(layer, index: int) -> tuple[nn.Module, str]:
    attn = getattr(layer, "self_attn", None)
    if attn is None or "q_proj" not in attn:
        raise UserError(f"layer {index} has no self_attn.q_proj: this model architecture is not supported")
    return attn, ("q_norm" if "q_norm" in attn else "q_proj")


def calibrate(model, tokenizer, shape: ModelShape, text: str, *, model_id: str, max_tokens: int | None = None,
              chunk_tokens: int = 2048, progress: bool = True) -> QueryStats:
    """Run the text through the model in chunks (one growing KV cache) and return its pre-RoPE query stats."""
    if chunk_tokens < 1:
        raise UserError(f"chunk size must be at least 1 token (got {chunk_tokens})")
    ids = calibration_token_ids(tokenizer, text, max_tokens)
    n = len(ids)
    if n == 0:
        raise UserError("calibration text has no tokens")
    layers = list(model.layers)
    if len(layers) != shape.num_layers:
        raise UserError(f"model has {len(layers)} layers, its config says {shape.num_layers}")
    sums = [_QuerySums(shape.num_heads, shape.head_dim) for _ in layers]
    wrapped = []
    try:
        for i, (layer, acc) in enumerate(zip(layers, sums)):
            attn, name = _query_attribute(layer, i)
            setattr(attn, name, _Recording(getattr(attn, name), acc))
            wrapped.append((attn, name))
        cache = make_prompt_cache(model)
        all_ids = mx.array(np.asarray(ids, dtype=np.int32))[None]
        with calibration_progress(progress, n) as advance:
            for start in range(0, n, chunk_tokens):
                chunk = all_ids[:, start:start + chunk_tokens]
                model(chunk, cache=cache)
                mx.eval([c.state for c in cache], [acc.pending for acc in sums])
                for acc in sums:
                    acc.fold()
                advance(chunk.shape[1])
    finally:
        for attn, name in wrapped:
            setattr(attn, name, getattr(attn, name).inner)

    for i, acc in enumerate(sums):
        if acc.tokens != n:
            raise RuntimeError(f"layer {i}: captured queries of {acc.tokens} tokens, expected {n}")
    totals = [np.stack([acc.totals[j] for acc in sums]) for j in range(3)]
    return stats_from_sums(shape, model_id, text, n, *totals, source=SOURCE)
