"""Writes the shared scorer test vectors with the reference (core numpy) scorer and policy.

Every backend's scorer is tested against these files: keys, stats, expected per-query-head scores, and the kept
slot indices of every pruning mode. Re-run only when the reference itself changes on purpose:
    python tests/vectors/make_vectors.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from triattn_local.policy import PRUNING_MODES
from triattn_local.rope import ModelShape
from triattn_local.scorer import TriAttentionScorer
from triattn_local.stats.format import QueryStats, meta_for_model

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from vectors_io import policy_keep  # noqa: E402
SEED = 1234
CONFIG = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, hidden_size=128, head_dim=32, rope_theta=10000.0, max_position_embeddings=4096)
T, ROUND_START = 96, 700  # ROUND_START: tokens seen; the newest cached position is ROUND_START - 1
POLICY = dict(budget=48, divide_length=48, window=8, sinks=2, protect_prefill=True)
PROMPT_LEN = 12


def make_stats(shape: ModelShape, rng) -> QueryStats:
    """Queries concentrated around a per-head centre, as in real models."""
    f = shape.head_dim // 2
    centre = rng.normal(size=(shape.num_layers, shape.num_heads, f)) + 1j * rng.normal(size=(shape.num_layers, shape.num_heads, f))
    spread = np.abs(rng.normal(size=centre.shape)) * 0.5
    inv_freq, scale = shape.rope_frequencies()
    return QueryStats(meta_for_model(shape, "test-vectors"), centre.real.astype(np.float32),
                      centre.imag.astype(np.float32), (np.abs(centre) + spread).astype(np.float32), inv_freq, scale)


def make_positions(rng, rows: int) -> np.ndarray:
    """Per row, sorted original positions of a cache that earlier rounds already compacted."""
    out = np.empty((rows, T), dtype=np.int64)
    for r in range(rows):
        recent = np.arange(ROUND_START - 16, ROUND_START)
        sinks = np.arange(0, 4)
        middle = rng.choice(np.arange(4, ROUND_START - 16), size=T - 20, replace=False)
        out[r] = np.sort(np.concatenate([sinks, middle, recent]))
    return out


def main() -> None:
    rng = np.random.default_rng(SEED)
    shape = ModelShape.from_hf_config(CONFIG)
    stats = make_stats(shape, rng)
    stats.save(HERE / "stats.safetensors")
    keys = rng.normal(size=(shape.num_layers, shape.num_kv_heads, T, shape.head_dim)).astype(np.float32)
    keys[..., 3, :] *= 4  # a few large keys, as sinks tend to be
    positions_rows = make_positions(rng, shape.num_layers * shape.num_kv_heads).reshape(
        shape.num_layers, shape.num_kv_heads, T)
    positions_shared = make_positions(rng, 1)[0]
    scorer = TriAttentionScorer(stats)
    head_scores = np.stack([scorer.head_scores(i, keys[i], ROUND_START) for i in range(shape.num_layers)])
    scorer_max = TriAttentionScorer(stats, offset_aggregation="max")
    head_scores_max = np.stack([scorer_max.head_scores(i, keys[i], ROUND_START) for i in range(shape.num_layers)])
    tensors = {"keys": keys, "positions_rows": positions_rows, "positions_shared": positions_shared,
               "head_scores": head_scores, "head_scores_max": head_scores_max}
    meta = {"round_start": ROUND_START, "prompt_len": PROMPT_LEN, "policy": POLICY, "group_aggregation": "max"}
    for mode in PRUNING_MODES:
        tensors[f"keep_{mode}"] = policy_keep(stats, meta, tensors, head_scores, mode)
    meta = {"round_start": str(ROUND_START), "prompt_len": str(PROMPT_LEN), "policy": json.dumps(POLICY),
            "group_aggregation": "max", "config": json.dumps(CONFIG), "seed": str(SEED)}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(HERE / "scorer_vectors.safetensors"),
              metadata=meta)
    print("wrote", HERE / "scorer_vectors.safetensors")


if __name__ == "__main__":
    main()
