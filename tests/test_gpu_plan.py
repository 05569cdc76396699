"""The torch form of the budget policy's choice (backends/torch/plan.py) against the core policy.

Run on the CPU here and on the GPU on the device (TRIATTN_TEST_DEVICE=cuda)."""

import os

import numpy as np
import pytest
import torch

from triattn_local.backends.torch.plan import expand_keep, plan_keep_rows
from triattn_local.compression import CompressionState
from triattn_local.policy import BudgetPolicy
from triattn_local.scorer import TriAttentionScorer
from vectors_io import load_vectors, mode_positions, policy_for, row_positions

DEVICE = os.environ.get("TRIATTN_TEST_DEVICE", "cpu")
MODES = ["per_layer_head", "per_head", "global"]


@pytest.mark.parametrize("mode", MODES)
def test_torch_plan_equals_the_shared_vectors(mode):
    stats, v, meta = load_vectors()
    policy = policy_for(meta, mode)
    group = stats.meta.num_heads // stats.meta.num_kv_heads
    scores = torch.tensor(v["head_scores"], device=DEVICE)[None]  # [1, L, H, T]
    positions = row_positions(mode_positions(v, mode), mode)
    keep = plan_keep_rows(policy, scores, torch.tensor(positions, device=DEVICE)[None], group,
                          meta["group_aggregation"], meta["round_start"], meta["prompt_len"])
    np.testing.assert_array_equal(keep[0].cpu().numpy(), v[f"keep_{mode}"])


def random_state(policy, layers, kv_heads, length, seed):
    """A CompressionState after a few rounds, so rows hold different, scattered positions."""
    stats, _, _ = load_vectors()
    scorer = TriAttentionScorer(stats)
    state = CompressionState(policy, scorer, layers, kv_heads)
    rng = np.random.default_rng(seed)
    state.prompt_len = 20
    while state.next_position < length:
        state.appended(policy.divide_length)
        if state.needs_compression():
            state.plan(rng.normal(size=(layers, stats.meta.num_heads, state.retained)).astype(np.float32))
    return state, scorer


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("protect", [False, True])
def test_torch_plan_equals_the_core_plan_on_a_batch_with_ties(mode, protect):
    stats, _, _ = load_vectors()
    layers, kv_heads, heads = stats.meta.num_layers, stats.meta.num_kv_heads, stats.meta.num_heads
    policy = BudgetPolicy(48, 16, 8, 2, protect_prefill=protect, pruning_mode=mode)
    rng = np.random.default_rng(0)
    batch_scores, batch_positions, want = [], [], []
    for b in range(3):
        state, scorer = random_state(policy, layers, kv_heads, 150, seed=b)  # rows differ in what they kept
        while not state.needs_compression():
            state.appended(1)
        scores = rng.integers(0, 4, size=(layers, heads, state.retained)).astype(np.float32)  # many exact ties
        batch_scores.append(scores)
        batch_positions.append(state.row_positions().copy())
        keep, _ = state.plan(scores)
        want.append(keep)
        seen = state.next_position
    got = plan_keep_rows(policy, torch.tensor(np.stack(batch_scores), device=DEVICE),
                         torch.tensor(np.stack(batch_positions), device=DEVICE), heads // kv_heads, "max",
                         seen, 20)
    got = expand_keep(got, layers, kv_heads, mode).cpu().numpy()
    np.testing.assert_array_equal(got, np.stack(want))
