"""A literal implementation of the reference TriAttention selection, written from the reference's description
(WeianMao/triattention: triattention/methods/triattention.py and its vLLM plugin's selector), for tests only.

Deliberately slow and plain: one query head at a time, one future offset at a time, in the reference's order:
1. score every candidate key at t = (tokens seen so far) + offset, averaged over the offsets 1, 2, 4 … max_offset;
2. z-score each query head's scores over the candidate tokens (population std, clamped at 1e-6); with the prompt
   protected, the candidates are the tokens after the prompt (the reference's HF path normalises decode tokens only);
3. max over the query heads of each GQA group;
4. per_head: mean over layers; per_layer_head: nothing more; global (the reference's union-based shared selection):
   every head's top-k, then the best k of their union by the max over all heads, filled from the rest if short;
5. top-k with the recent window (and sinks, and the protected prompt) always kept; ties to the earlier position.
"""

from __future__ import annotations

import numpy as np

from triattn_local.rope import to_complex_pairs


def literal_head_scores(stats, layer: int, head: int, keys: np.ndarray, tokens_seen: int, offsets) -> np.ndarray:
    """One query head's score of each key row keys [T, D] (post-RoPE), one offset at a time."""
    q = stats.q_mean_real[layer, head].astype(np.float64) + 1j * stats.q_mean_imag[layer, head].astype(np.float64)
    m = stats.q_abs_mean[layer, head].astype(np.float64)
    s2 = stats.freq_scale.astype(np.float64) ** 2
    omega = stats.inv_freq.astype(np.float64)
    k = to_complex_pairs(keys.astype(np.float64), stats.meta.rope_pairing)  # [T, F]
    magnitude = (s2 * (m - np.abs(q)) * np.abs(k)).sum(axis=-1)
    total = np.zeros(len(keys))
    for offset in offsets:
        t = tokens_seen + offset
        total += (s2 * (q * np.conj(k) * np.exp(1j * t * omega)).real).sum(axis=-1) + magnitude
    return total / len(offsets)


def zscore(scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    x = scores[candidates]
    std = max(float(np.sqrt(((x - x.mean()) ** 2).mean())), 1e-6)
    return (scores - x.mean()) / std


def top_k(scores: np.ndarray, positions: np.ndarray, forced: np.ndarray, k: int) -> list[int]:
    """Slot indices of the k best (forced first, ties to the earlier position), in ascending position order."""
    key = np.where(forced, np.inf, scores)
    order = sorted(range(len(scores)), key=lambda i: (-key[i], positions[i]))[:k]
    return sorted(order, key=lambda i: positions[i])


def literal_raw_scores(stats, keys: np.ndarray, tokens_seen: int, offsets=None) -> np.ndarray:
    """Raw scores [layers, heads, T] of keys [layers, kv_heads, T, D], one query head at a time (GQA: query head h
    reads KV head h // group)."""
    offsets = 2.0 ** np.arange(17) if offsets is None else offsets
    layers, kv_heads, t, _ = keys.shape
    heads = stats.meta.num_heads
    out = np.zeros((layers, heads, t))
    for layer in range(layers):
        for head in range(heads):
            out[layer, head] = literal_head_scores(stats, layer, head, keys[layer, head // (heads // kv_heads)],
                                                   tokens_seen, offsets)
    return out


def literal_select(raw: np.ndarray, positions: np.ndarray, tokens_seen: int, *, mode: str, budget: int,
                   window: int, sinks: int = 0, prompt_len: int = 0, protect_prompt: bool = False):
    """Raw scores [layers, heads, T] and each slot's original position [layers, kv_heads, T] → (kept slot indices,
    the score each row ranked by, +inf where forced): [layers·kv_heads, k] (per_layer_head), [kv_heads, k]
    (per_head) or [1, k] (global)."""
    layers, heads, t = raw.shape
    kv_heads = positions.shape[1]
    group = heads // kv_heads
    k = min(budget, t)

    def forced(pos):
        keep = (pos >= tokens_seen - window) | (pos < sinks)
        return keep | (pos < prompt_len) if protect_prompt else keep

    def candidates(pos):
        return pos >= prompt_len if protect_prompt else np.ones(len(pos), dtype=bool)

    z = np.zeros((layers, heads, t))
    for layer in range(layers):
        for head in range(heads):
            z[layer, head] = zscore(raw[layer, head], candidates(positions[layer, head // group]))
    group_max = np.stack([[z[layer, g * group:(g + 1) * group].max(axis=0) for g in range(kv_heads)]
                          for layer in range(layers)])  # [layers, kv_heads, T]

    if mode == "per_layer_head":
        rows = [(group_max[layer, g], positions[layer, g]) for layer in range(layers) for g in range(kv_heads)]
        keep = [top_k(score, pos, forced(pos), k) for score, pos in rows]
        return np.array(keep), np.array([np.where(forced(pos), np.inf, score) for score, pos in rows])
    if mode == "per_head":
        rows = [(group_max[:, g].mean(axis=0), positions[0, g]) for g in range(kv_heads)]
        keep = [top_k(score, pos, forced(pos), k) for score, pos in rows]
        return np.array(keep), np.array([np.where(forced(pos), np.inf, score) for score, pos in rows])
    # global, union-based: each query head's own top-k, then the best k of the union by the max over all heads
    pos = positions[0, 0]
    guarded = np.where(forced(pos), np.inf, 0.0)
    combined = (z + guarded).reshape(-1, t).max(axis=0)
    union = set()
    for row in (z + guarded).reshape(-1, t):
        union.update(top_k(row, pos, np.zeros(t, dtype=bool), k))
    chosen = sorted(union, key=lambda i: (-combined[i], pos[i]))[:k]
    if len(chosen) < k:
        rest = sorted(set(range(t)) - set(chosen), key=lambda i: (-combined[i], pos[i]))
        chosen += rest[: k - len(chosen)]
    return np.array([sorted(chosen, key=lambda i: pos[i])]), np.array([combined])
