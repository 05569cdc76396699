"""The fairness diagnostics: the attention and query measures on inputs whose answers are known."""

from __future__ import annotations

import numpy as np
import torch

from triattn_local.diagnose import layer_measures, query_concentration


def causal_uniform(H: int, T: int) -> torch.Tensor:
    a = torch.tril(torch.ones(T, T))
    return (a / a.sum(-1, keepdim=True)).expand(H, T, T).clone()


def test_uniform_attention_is_spread_and_oracle_equals_random():
    T, start = 600, 200
    m = layer_measures(causal_uniform(2, T), start, [128], next_n=64, kv_heads=1, rng=np.random.default_rng(0))
    rows = torch.arange(start, T) + 1.0
    assert abs(m["effective_keys"] - float(rows.mean())) < 1e-2  # exp(entropy) of uniform over t keys = t
    assert abs(m["sink_mass"] - float((4 / rows).mean())) < 1e-4
    # every older key is worth the same: the oracle keeps no more than B / r of the mass, like random and recency
    assert abs(m["oracle"][128] - m["random"][128]) < 1e-3
    assert abs(m["oracle"][128] - m["recent"][128]) < 1e-3


def test_sparse_attention_oracle_keeps_everything_random_does_not():
    H, T, start = 2, 512, 128
    a = torch.zeros(H, T, T)
    for t in range(T):
        a[:, t, t // 7] = 1.0  # each query reads one far key
    m = layer_measures(a, start, [128], next_n=64, kv_heads=1, rng=np.random.default_rng(0))
    assert m["effective_keys"] < 1.01 and m["top64_share"] > 0.999
    assert m["oracle"][128] > 0.999
    assert m["random"][128] < 0.8
    assert m["recent"][128] < 0.01  # the keys needed are far back


def test_query_concentration_one_for_fixed_directions_low_for_random():
    fixed = torch.ones(100, 3, 8) * torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8])
    assert np.allclose(query_concentration(fixed), 1.0)
    noise = torch.randn(5000, 3, 8, generator=torch.Generator().manual_seed(0))
    assert (query_concentration(noise) < 0.1).all()
