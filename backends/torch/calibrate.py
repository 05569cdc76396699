"""Measure pre-RoPE query statistics of a transformers model (or a StaticKVModel, e.g. an AWQ checkpoint) on
calibration text.

TriAttention scores keys with, per (layer, query head, frequency pair f), the complex mean E[q_f] and the mean
magnitude E|q_f| of the queries *before* RoPE. We run the text through the model and capture those queries with
forward hooks: after q_norm where the model has one (Qwen3, and every StaticKVModel: an identity where the
architecture has none), else straight from q_proj. (The reference calibration skipped Qwen3's q_norm; the attention
actually rotates the normed query, so that is what we must measure.)
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from ...errors import UserError
from ...rope import ModelShape
from ...calibration import calibration_progress, calibration_token_ids, stats_from_sums
from ...stats.format import QueryStats

SOURCE = "triattn calibrate"


class _QueryAccumulator:
    """Float64 running sums of q_f and |q_f| per (head, f) for one layer, fed by a forward hook."""

    def __init__(self, num_heads: int, head_dim: int):
        self.num_heads, self.head_dim = num_heads, head_dim
        self.sum_real = self.sum_imag = self.sum_abs = None
        self.tokens = 0

    def hook(self, module, args, output) -> None:
        q = output.detach()
        if q.device.type == "mps":  # no float64 on MPS
            q = q.cpu()
        q = q.reshape(-1, self.num_heads, self.head_dim).to(torch.float64)  # [tokens, H, D] from [B,T,H,D] or [B,T,H*D]
        d = self.head_dim // 2
        re, im = q[..., :d], q[..., d:]  # 'half' pairing, as HF rotate_half
        sums = (re.sum(0), im.sum(0), torch.sqrt(re * re + im * im).sum(0))
        if self.sum_real is None:
            self.sum_real, self.sum_imag, self.sum_abs = sums
        else:
            self.sum_real += sums[0]
            self.sum_imag += sums[1]
            self.sum_abs += sums[2]
        self.tokens += q.shape[0]


def _query_module(layer, index: int):
    """The module whose output is the pre-RoPE query: q_norm if the attention has one, else q_proj."""
    attn = getattr(layer, "self_attn", None)
    q_norm = getattr(attn, "q_norm", None)
    if q_norm is not None:
        return q_norm
    if attn is None or not hasattr(attn, "q_proj"):
        raise UserError(f"layer {index} has no self_attn.q_proj: this model architecture is not supported")
    return attn.q_proj


def _cache_kwarg(base_model) -> str:
    """transformers 5.24 renamed past_key_values to cache; pass whichever this version's forward takes."""
    params = inspect.signature(base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def calibrate(
    model,
    tokenizer,
    text: str,
    *,
    model_id: str,
    max_tokens: int | None = None,
    chunk_tokens: int = 2048,
    progress: bool = True,
) -> QueryStats:
    """Run the text through the model in chunks (one growing KV cache; a StaticKVModel gets a static cache of
    the text's length for the run) and return its pre-RoPE query stats."""
    from transformers import DynamicCache

    from .static_model import StaticKVModel

    if chunk_tokens < 1:
        raise UserError(f"chunk size must be at least 1 token (got {chunk_tokens})")
    static = isinstance(model, StaticKVModel)
    shape = ModelShape.from_hf_config(model.cfg if static else model.config.to_dict())
    inv_freq, freq_scale = shape.rope_frequencies()
    ids = calibration_token_ids(tokenizer, text, max_tokens)
    n = len(ids)
    if n == 0:
        raise UserError("calibration text has no tokens")

    base = getattr(model, "model", None)  # the decoder without lm_head: no logits needed
    if base is None or not hasattr(base, "layers"):
        raise UserError(f"{type(model).__name__} has no model.layers: this model architecture is not supported")
    layers = list(base.layers)
    if len(layers) != shape.num_layers:
        raise UserError(f"model has {len(layers)} layers, its config says {shape.num_layers}")
    accs = [_QueryAccumulator(shape.num_heads, shape.head_dim) for _ in layers]
    handles = []
    # A StaticKVModel's cache buffers are a runner's: put back afterwards. Its fused decode step (one-token chunks)
    # would skip the q_norm module the hooks watch: off while calibrating.
    saved = (model.k_cache, model.v_cache, getattr(model, "fused_decode", False)) if static else None
    try:
        for i, (layer, acc) in enumerate(zip(layers, accs)):
            handles.append(_query_module(layer, i).register_forward_hook(acc.hook))
        device = next(model.parameters()).device
        all_ids = torch.tensor([ids], dtype=torch.long, device=device)
        cache_kw = None if static else _cache_kwarg(base)
        with torch.inference_mode(), calibration_progress(progress, n) as advance:
            if static:
                model.allocate(1, n)
                model.fused_decode = False
                # its masked attention may take torch's math path, which holds a chunk × n score matrix per head:
                # smaller chunks keep that within a 24 GB card next to a 32B model (the stats do not change)
                chunk_tokens = min(chunk_tokens, 512)
            else:
                cache = DynamicCache(config=model.config)
            for start in range(0, n, chunk_tokens):
                chunk = all_ids[:, start : start + chunk_tokens]
                positions = torch.arange(start, start + chunk.shape[1], device=device).unsqueeze(0)
                if static:  # slot = position: the text fills the cache from slot 0
                    model(chunk, positions[0], positions[0])
                else:
                    base(input_ids=chunk, position_ids=positions, use_cache=True, **{cache_kw: cache})
                advance(chunk.shape[1])
    finally:
        for h in handles:
            h.remove()
        if static:
            model.k_cache, model.v_cache, model.fused_decode = saved

    for i, acc in enumerate(accs):
        if acc.tokens != n:
            raise RuntimeError(f"layer {i}: captured queries of {acc.tokens} tokens, expected {n}")

    totals = [np.stack([getattr(a, name).cpu().numpy() for a in accs]) for name in ("sum_real", "sum_imag", "sum_abs")]
    return stats_from_sums(shape, model_id, text, n, *totals, source=SOURCE)
