"""Loads the shared scorer test vectors (tests/vectors), for every backend's scorer tests."""

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from triattn_local.policy import BudgetPolicy
from triattn_local.stats.format import QueryStats

HERE = Path(__file__).parent / "vectors"


def load_vectors():
    with safe_open(str(HERE / "scorer_vectors.safetensors"), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    stats = QueryStats.load(HERE / "stats.safetensors")
    meta = dict(meta, round_start=int(meta["round_start"]), prompt_len=int(meta["prompt_len"]),
                policy=json.loads(meta["policy"]), config=json.loads(meta["config"]))
    return stats, tensors, meta


def policy_for(meta, mode: str) -> BudgetPolicy:
    return BudgetPolicy(pruning_mode=mode, **meta["policy"])


def mode_positions(v, mode: str) -> np.ndarray:
    """Slot positions [layers, kv_heads, T] as a mode's bookkeeping holds them: own rows per (layer, KV head); one
    row per KV head shared by the layers; or one row for everything."""
    rows = v["positions_rows"]
    if mode == "per_layer_head":
        return rows
    if mode == "per_head":
        return np.broadcast_to(rows[:1], rows.shape)
    return np.broadcast_to(v["positions_shared"], rows.shape)


def row_positions(positions: np.ndarray, mode: str) -> np.ndarray:
    """[layers, kv_heads, T] → the [rows, T] positions of the mode's choosing rows."""
    if mode == "per_layer_head":
        return positions.reshape(-1, positions.shape[-1])
    return positions[0] if mode == "per_head" else positions[0, :1]


def policy_keep(stats, meta, v, head_scores: np.ndarray, mode: str) -> np.ndarray:
    """The core policy's kept slots [rows, B] for per-query-head scores [layers, heads, T] of the shared keys."""
    policy = policy_for(meta, mode)
    positions = mode_positions(v, mode)
    group = stats.meta.num_heads // stats.meta.num_kv_heads
    rows = policy.combine(head_scores, group, policy.candidates(positions, meta["prompt_len"]),
                          meta["group_aggregation"])
    return policy.select(rows, row_positions(positions, mode), meta["round_start"], meta["prompt_len"])
