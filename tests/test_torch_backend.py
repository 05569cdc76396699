"""The PyTorch backend end to end on tiny random-init models of each architecture."""

import numpy as np
import pytest
import torch

from triattn_local.backends import load_engine
from triattn_local.engine import CompressionEvent, CompressionSettings, DoneEvent, TokenEvent
from triattn_local.policy import BudgetPolicy
from triattn_local.sampling import SamplingParams
from triattn_local.stats.format import QueryStats, meta_for_model
from triattn_local.backends.torch.cache import score_keys_torch
from triattn_local.scorer import TriAttentionScorer
from vectors_io import load_vectors

ARCHS = ["qwen3", "qwen2", "llama"]


def synthetic_stats(shape, seed=0):
    rng = np.random.default_rng(seed)
    size = (shape.num_layers, shape.num_heads, shape.head_dim // 2)
    real, imag = rng.normal(size=size), rng.normal(size=size)
    inv, scale = shape.rope_frequencies()
    return QueryStats(meta_for_model(shape, "synthetic"), real.astype(np.float32), imag.astype(np.float32),
                      (np.hypot(real, imag) + 0.5).astype(np.float32), inv, scale)


def generate(engine, prompt, policy, n, temperature=0.0, seed=None):
    settings = CompressionSettings(policy=policy, stats=synthetic_stats(engine.shape) if policy else None)
    session = engine.session(settings)
    tokens, rounds, done = [], [], None
    for ev in session.generate(prompt, SamplingParams(max_tokens=n, temperature=temperature, seed=seed)):
        if isinstance(ev, TokenEvent):
            tokens.append(ev.token_id)
        elif isinstance(ev, CompressionEvent):
            rounds.append(ev.record)
        elif isinstance(ev, DoneEvent):
            done = ev
    return tokens, rounds, done, session


def watch_cache_sizes(session) -> list[set]:
    """Record, after every forward of the session, the set of cache tensor shapes over its layers."""
    sizes = []
    forward = session.runner.forward

    def watched_forward(ids, start):
        out = forward(ids, start)
        sizes.append({tuple(layer.keys.shape) for layer in session.runner.cache.layers})
        return out

    session.runner.forward = watched_forward
    return sizes


@pytest.mark.parametrize("arch", ARCHS)
def test_large_budget_matches_transformers_generate(arch, tiny_model_factory):
    """Budget above the whole sequence: token-for-token the same greedy output as transformers' own generate."""
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory(arch)
    engine = load_engine(str(path), device="cpu")
    prompt = list(range(5, 70))
    # divide_length 16 makes the prompt go through in chunks, as it does under compression
    tokens, rounds, done, _ = generate(engine, prompt, BudgetPolicy(budget=4096, divide_length=16, window=8), 60)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=60, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert len(tokens) >= 20 and rounds == []
    assert tokens == ref[:len(tokens)]
    full, _, _, _ = generate(engine, prompt, None, 60)  # --no-compress gives the same
    assert full == tokens


@pytest.mark.parametrize("mode", ["per_layer_head", "per_head", "global"])
def test_retained_kv_never_exceeds_budget_plus_divide_length(mode, tiny_model_factory):
    engine = load_engine(str(tiny_model_factory("qwen3")), device="cpu")
    budget, divide = 48, 16
    prompt = list(np.random.default_rng(0).integers(5, 300, size=5 * budget))  # several times the budget
    session = engine.session(CompressionSettings(BudgetPolicy(budget, divide, 8, 2, pruning_mode=mode),
                                                 synthetic_stats(engine.shape)))
    sizes = watch_cache_sizes(session)
    events = list(session.generate([int(x) for x in prompt], SamplingParams(max_tokens=80, temperature=0.8, seed=1)))
    done = events[-1]
    assert max(shape[2] for s in sizes for shape in s) <= budget + divide
    assert all(len(s) == 1 for s in sizes)  # every layer holds the same number of slots
    assert done.metrics.peak_retained_tokens == budget + divide
    assert done.metrics.logical_tokens == len(prompt) + done.generated_tokens - 1
    assert done.metrics.rounds == (done.metrics.logical_tokens - budget - divide) // divide + 1
    assert done.metrics.kv_bytes < done.metrics.kv_bytes_full


def test_compressed_cache_equals_attention_restricted_to_kept_positions(tiny_model_factory):
    """Global mode, original positions: the compressed run's logits equal a full-cache run whose mask lets each
    token see exactly what the cache held when it was processed. Nothing is re-rotated or shifted."""
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory("qwen3")
    engine = load_engine(str(path), device="cpu")
    budget, divide, n = 24, 8, 70
    prompt = [int(x) for x in np.random.default_rng(3).integers(5, 300, size=n)]
    session = engine.session(CompressionSettings(BudgetPolicy(budget, divide, 4, 1, pruning_mode="global"),
                                                 synthetic_stats(engine.shape)))
    visible = np.zeros((n, n), dtype=bool)  # visible[q, k]: token q attended to token k
    cached = np.zeros(0, dtype=np.int64)  # positions the cache holds, as the test sees it
    forward = session.runner.forward
    last = {}

    def watched_forward(ids, start):
        nonlocal cached
        for i in range(len(ids)):
            visible[start + i, cached] = True
            visible[start + i, start:start + i + 1] = True
        cached = np.concatenate([cached, np.arange(start, start + len(ids))])
        last["logits"] = forward(ids, start)
        return last["logits"]

    session.runner.forward = watched_forward
    for item in session._feed(prompt):
        if isinstance(item, CompressionEvent):
            cached = np.array(item.record.kept[0][2])
    model = AutoModelForCausalLM.from_pretrained(str(path))
    mask = torch.where(torch.tensor(visible), 0.0, float("-inf"))[None, None]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([prompt]), attention_mask=mask).logits[0, -1].numpy()
    assert session.state.rounds >= 5
    np.testing.assert_allclose(last["logits"], ref, rtol=1e-4, atol=1e-4)


def test_torch_scorer_matches_shared_vectors():
    stats, v, meta = load_vectors()
    scorer = TriAttentionScorer(stats)
    rq = scorer.round_queries(meta["round_start"])
    for layer in range(stats.meta.num_layers):
        got = score_keys_torch(torch.tensor(v["keys"][layer]), rq.virtual_query[layer], rq.magnitude_weight[layer])
        np.testing.assert_allclose(got.numpy(), v["head_scores"][layer], rtol=1e-4, atol=1e-4)


def test_compaction_keeps_the_chosen_keys(tiny_model_factory):
    engine = load_engine(str(tiny_model_factory("llama")), device="cpu")
    session = engine.session(CompressionSettings(BudgetPolicy(32, 8, 4, 1, pruning_mode="per_layer_head"),
                                                 synthetic_stats(engine.shape)))
    runner = session.runner
    runner.forward(list(range(5, 45)), 0)
    before = [layer.keys.clone() for layer in runner.cache.layers]
    rng = np.random.default_rng(0)
    keep = np.sort(np.stack([np.stack([rng.choice(40, 32, replace=False) for _ in range(2)]) for _ in range(3)]), -1)
    runner.compact(keep)
    for i, layer in enumerate(runner.cache.layers):
        for h in range(2):
            assert torch.equal(layer.keys[0, h], before[i][0, h, keep[i, h]])


def test_sampling_is_reproducible_with_a_seed(tiny_model_factory):
    engine = load_engine(str(tiny_model_factory("qwen2")), device="cpu")
    a = generate(engine, list(range(5, 30)), None, 30, temperature=1.0, seed=7)[0]
    b = generate(engine, list(range(5, 30)), None, 30, temperature=1.0, seed=7)[0]
    c = generate(engine, list(range(5, 30)), None, 30, temperature=1.0, seed=8)[0]
    assert a == b and a != c
