"""The budget policy: validation, what is always kept, ties, and the B + N bound."""

import numpy as np
import pytest

from triattn_local.compression import CompressionState
from triattn_local.errors import UserError
from triattn_local.policy import BudgetPolicy
from triattn_local.scorer import TriAttentionScorer
from test_scorer import random_stats


@pytest.mark.parametrize("kwargs, words", [
    (dict(budget=100, window=90, sinks=10), r"larger than window \+ sinks"),
    (dict(budget=100, window=10, sinks=4, pruning_mode="sideways"), "unknown pruning mode"),
    (dict(budget=100, divide_length=0), "divide length"),
    (dict(budget=100, window=-1), "negative"),
])
def test_bad_policies_are_refused(kwargs, words):
    with pytest.raises(UserError, match=words):
        BudgetPolicy(**kwargs)


def test_select_keeps_sinks_window_and_best_scores():
    policy = BudgetPolicy(budget=10, divide_length=5, window=3, sinks=2, pruning_mode="global")
    positions = np.arange(15)[None]
    scores = np.zeros((1, 15))
    scores[0, [5, 7, 9, 4, 6]] = [5, 4, 3, 2, 1]
    keep = policy.select(scores, positions, next_position=15, prompt_len=0)[0]
    assert keep.tolist() == sorted([0, 1, 12, 13, 14, 5, 7, 9, 4, 6])


def test_defaults_are_the_reference_plugins():
    """Budget 2048, divide length 128, window 128, no sinks, per_head, prompt not protected (the reference vLLM
    plugin's defaults)."""
    p = BudgetPolicy()
    assert (p.budget, p.divide_length, p.window, p.sinks, p.pruning_mode, p.protect_prefill) == \
        (2048, 128, 128, 0, "per_head", False)


def test_each_query_head_is_normalised_before_the_group_max():
    """A query head with 100x larger scores must not decide its group alone: z-scores first, then the max."""
    policy = BudgetPolicy(budget=3, divide_length=1, window=1, pruning_mode="per_layer_head")
    loud = np.array([10.0, 12.0, 11.0, 10.0, 10.0, 10.0])  # prefers slots 1 and 2, on a large scale
    quiet = np.array([0.0, 0.0, 0.0, 5.0, 0.0, 0.0])  # one clear outlier, slot 3, on a small scale
    rows = policy.combine(np.stack([loud, quiet])[None], 2, np.ones((1, 1, 6), dtype=bool))
    keep = policy.select(rows, np.arange(6)[None], next_position=6, prompt_len=0)[0]
    assert keep.tolist() == [1, 3, 5]  # the max of raw scores would keep slots 1, 2 (and the window, 5)


def test_window_is_the_last_tokens_seen():
    """Queries sit after the newest token; the window is still the W newest positions."""
    policy = BudgetPolicy(budget=4, divide_length=2, window=2, pruning_mode="global")
    protected = policy.protected(np.arange(10), next_position=10, prompt_len=0)
    assert np.flatnonzero(protected).tolist() == [8, 9]


def test_ties_go_to_earlier_positions():
    policy = BudgetPolicy(budget=6, divide_length=4, window=1, sinks=1, pruning_mode="global")
    positions = np.array([[0, 3, 5, 8, 9, 11, 12, 20, 21, 30]])
    keep = policy.select(np.ones((1, 10)), positions, next_position=31, prompt_len=0)[0]
    assert positions[0, keep].tolist() == [0, 3, 5, 8, 9, 30]


def test_prompt_protection_and_its_limit():
    policy = BudgetPolicy(budget=10, divide_length=4, window=2, sinks=0, protect_prefill=True, pruning_mode="global")
    positions = np.arange(14)[None]
    scores = -np.arange(14.0)[None]  # later is worse, so only protection keeps late prompt tokens
    scores[0, 9] = 100
    keep = policy.select(scores, positions, next_position=14, prompt_len=7)[0]
    assert set(range(7)) <= set(keep.tolist()) and {12, 13} <= set(keep.tolist())
    with pytest.warns(UserWarning, match="compressed like other tokens"):
        keep = policy.select(scores, positions, next_position=14, prompt_len=9)[0]
    assert len(keep) == 10 and 9 in keep.tolist()


@pytest.mark.parametrize("mode", ["per_layer_head", "per_head", "global"])
def test_state_never_exceeds_budget_plus_divide_length(mode):
    """Simulated long prompt (6 x budget) then decoding: the retained count stays ≤ B + N and ends at the budget."""
    stats = random_stats()
    scorer = TriAttentionScorer(stats)
    policy = BudgetPolicy(budget=32, divide_length=8, window=4, sinks=2, pruning_mode=mode)
    state = CompressionState(policy, scorer, stats.meta.num_layers, stats.meta.num_kv_heads)
    rng = np.random.default_rng(0)
    prompt, seen = 6 * 32, []
    state.prompt_len = prompt
    fed = 0
    while fed < prompt + 50:
        n = policy.prefill_chunk(state.retained) if fed < prompt else 1
        n = min(n, prompt - fed) if fed < prompt else 1
        state.appended(n)
        fed += n
        seen.append(state.retained)
        if state.needs_compression():
            keep, record = state.plan(rng.normal(size=(2, 6, state.retained)))
            assert keep.shape == (2, 2, 32)
            # kept positions are sorted, unique, and always include the newest token
            for row in state.positions.reshape(-1, 32):
                assert np.all(np.diff(row) > 0) and row[-1] == state.next_position - 1 and row[0] == 0
            lines = record.trace_lines()
            assert len(lines) == {"per_layer_head": 4, "per_head": 2, "global": 1}[mode]
    assert max(seen) <= 40 and state.peak_retained == 40 and state.rounds > 10
    if mode != "per_layer_head":
        assert (state.positions == state.positions[0, :1] if mode == "global" else state.positions == state.positions[:1]).all()
