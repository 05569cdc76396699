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


def test_marked_errors_show_every_token_of_the_reference_and_mark_the_misses(tmp_path):
    """The teacher-forced error view: with the marks resolved to their expected side it is the reference response's
    first lines, word for word; an untrained model misses tokens, and each miss is marked."""
    import random
    import re
    import shutil
    from importlib import resources

    from transformers import Qwen3Config, Qwen3ForCausalLM

    from triattn_local.demo.ledger import make_problem
    from triattn_local.diagnose import marked_errors

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path)
    tokenizer_dir = resources.files("triattn_local") / "demo" / "ledger_model"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(str(tokenizer_dir / name), tmp_path / name)
    problem = make_problem(random.Random(1), trades=8, people=12, filler_rate=0.0)
    text, accuracy = marked_errors(str(tmp_path), problem, lines=3)
    resolved = re.sub(r"\[(.*?)\|.*?\]", r"\1", text, flags=re.S)
    assert resolved == "".join(problem.response.splitlines(keepends=True)[:3])
    assert "[" in text and 0.0 <= accuracy < 0.5


def test_copying_tells_a_model_that_copies_from_one_that_does_not():
    """The copying measure: a perfect copier (it predicts the token one period back, once there is one) gets the
    second copy right and the first wrong; a model that ignores the context gets neither."""
    from triattn_local.diagnose import copying

    vocab = 500

    def copier(ids):
        logits = np.zeros((len(ids), vocab))
        period = len(ids) // 2
        for i in range(period - 1, len(ids) - 1):
            logits[i, ids[i + 1 - period]] = 20.0
        return logits

    def unigram(ids):
        return np.tile(np.linspace(0, 1, vocab), (len(ids), 1))

    c = copying(copier, range(10, vocab), length=100, trials=2)
    assert c["second_copy_accuracy"] > 0.95 and c["second_copy_nll"] < 0.5 < 5 < c["first_copy_nll"]
    u = copying(unigram, range(10, vocab), length=100, trials=2)
    assert u["second_copy_accuracy"] < 0.05 and abs(u["second_copy_nll"] - u["first_copy_nll"]) < 0.2
