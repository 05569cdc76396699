"""What every backend's calibration shares: the token ids of the text, the progress bar, and turning the summed
pre-RoPE queries into a validated stats file. A backend only captures the queries (hooks, wrapped modules, an eval
callback) and sums them per layer, head and frequency pair."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager

import numpy as np

from .rope import ModelShape
from .stats.format import QueryStats, meta_for_model


def calibration_token_ids(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of the text as the model would see it in a prompt (the tokenizer's usual specials, e.g. BOS)."""
    ids = list(tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"])
    return ids[:max_tokens] if max_tokens is not None else ids


@contextmanager
def calibration_progress(enabled: bool, total: int):
    """Yield advance(k): a transient rich progress bar over tokens on stderr, or a no-op."""
    if not enabled:
        yield lambda k: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("calibrating", total=total)
        yield lambda k: bar.advance(task, k)


def stats_from_sums(shape: ModelShape, model_id: str, text: str, tokens: int, sum_real: np.ndarray,
                    sum_imag: np.ndarray, sum_abs: np.ndarray, source: str) -> QueryStats:
    """Sums [layers, heads, head_dim/2] over `tokens` queries → the stats file's means, validated."""
    inv_freq, freq_scale = shape.rope_frequencies()
    meta = meta_for_model(shape, model_id, calibration_tokens=tokens,
                          calibration_text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(), source=source)
    stats = QueryStats(meta, *(np.asarray(s / tokens, dtype=np.float32) for s in (sum_real, sum_imag, sum_abs)),
                       inv_freq, freq_scale)
    stats.validate("calibration result")
    return stats
