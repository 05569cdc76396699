"""Loads the shared scorer test vectors (tests/vectors), for every backend's scorer tests."""

import json
from pathlib import Path

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
