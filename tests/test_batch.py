"""Batched generation (triattn_local.batch): many prompts of one length at once, each row with its own compressed
cache, giving the same results per row as running the prompt alone through Session.generate."""

import numpy as np
import pytest
import torch

from test_torch_backend import synthetic_stats
from triattn_local.backends import load_engine
from triattn_local.batch import generate_batch
from triattn_local.engine import CompressionEvent, CompressionSettings, DoneEvent, TextEvent, TokenEvent
from triattn_local.errors import UserError
from triattn_local.methods import METHODS
from triattn_local.policy import BudgetPolicy
from triattn_local.sampling import SamplingParams

FULL = "full"  # policy None: full attention


def settings(engine, method, policy):
    if method == FULL:
        return CompressionSettings(policy=None)
    stats = synthetic_stats(engine.shape) if method == "triattention" else None
    return CompressionSettings(policy=policy, stats=stats, method=method)


def prompts_of(length, count, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(x) for x in rng.integers(5, 300, size=length)] for _ in range(count)]


def single(engine, prompt, s, params):
    """Session.generate alone: (tokens, text, finish_reason, metrics, kept positions of every round)."""
    tokens, text, rounds, done = [], "", [], None
    for ev in engine.session(s).generate(prompt, params):
        if isinstance(ev, TokenEvent):
            tokens.append(ev.token_id)
        elif isinstance(ev, TextEvent):
            text += ev.text
        elif isinstance(ev, CompressionEvent):
            rounds.append(ev.record.kept)
        elif isinstance(ev, DoneEvent):
            done = ev
    return tokens, text, done.finish_reason, done.metrics, rounds


def batched(engine, prompts, s, params):
    """generate_batch, plus every row's kept positions of every round."""
    rounds = {i: [] for i in range(len(prompts))}
    results = generate_batch(engine, prompts, s, params, on_round=lambda row, record: rounds[row].append(record.kept))
    return results, rounds


def watch_forwards(engine, monkeypatch):
    """Record (rows, start_position, {K shape of every layer}) after every forward of the runners made from now on."""
    seen = []
    make = engine.new_runner

    def new_runner(scorer=None, capacity=None):
        runner = make(scorer, capacity)
        forward = runner.forward

        def watched(token_ids, start_position):
            out = forward(token_ids, start_position)
            seen.append((len(token_ids), start_position, {tuple(layer.keys.shape) for layer in runner.cache.layers}))
            assert out.ndim == 2 and out.shape[0] == len(token_ids)  # logits [B, vocab]
            return out

        runner.forward = watched
        return runner

    monkeypatch.setattr(engine, "new_runner", new_runner)
    return seen


@pytest.fixture(scope="module")
def engine(tiny_model_factory):
    return load_engine(str(tiny_model_factory("qwen3")), device="cpu")


@pytest.mark.parametrize("mode", ["per_head", "per_layer_head"])
@pytest.mark.parametrize("method", [*METHODS, FULL])
def test_greedy_batch_equals_each_prompt_alone(method, mode, engine):
    """Token for token, text, finish reason, KV metrics and the kept positions of every round: each row of the
    batch is its prompt run alone. The prompt (50) exceeds budget + divide (40), so rounds run in the prefill and
    again while decoding; some rows end early at EOS and leave the batch."""
    policy = BudgetPolicy(32, 8, 8, 2, pruning_mode=mode)
    s = settings(engine, method, policy)
    prompts = prompts_of(50, 4)
    params = SamplingParams(max_tokens=40, temperature=0)
    results, rounds = batched(engine, prompts, s, params)
    for i, prompt in enumerate(prompts):
        tokens, text, finish, metrics, kept = single(engine, prompt, s, params)
        r = results[i]
        assert (r.token_ids, r.text, r.finish_reason) == (tokens, text, finish), (method, mode, i)
        assert r.metrics == metrics
        assert rounds[i] == kept
    if method != FULL:
        assert all(len(rounds[i]) >= 2 for i in rounds)
        assert max(len(rounds[i]) for i in rounds) >= 5  # rounds while decoding too


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_sampled_rows_use_their_own_seed(arch, tiny_model_factory):
    """Temperature > 0: row r samples as the prompt alone with seed params.seed + r (its own Sampler)."""
    engine = load_engine(str(tiny_model_factory(arch)), device="cpu")
    s = settings(engine, "triattention", BudgetPolicy(24, 8, 4, 1, pruning_mode="per_layer_head"))
    prompts = prompts_of(30, 3, seed=1)
    params = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.95, seed=5)
    results, rounds = batched(engine, prompts, s, params)
    for i, prompt in enumerate(prompts):
        alone = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.95, seed=5 + i)
        tokens, text, finish, metrics, kept = single(engine, prompt, s, alone)
        assert (results[i].token_ids, results[i].text, results[i].finish_reason) == (tokens, text, finish)
        assert results[i].metrics == metrics and rounds[i] == kept
    assert len({tuple(r.token_ids) for r in results}) == 3


@pytest.mark.parametrize("method", ["snapkv", "h2o", FULL])
def test_finished_rows_leave_the_batch_and_keep_their_results(method, engine, monkeypatch):
    """Rows end at different steps (EOS, a stop string, max_tokens): each decode forward runs only the rows still
    going, and every row's result is what its prompt alone gives."""
    s = settings(engine, method, BudgetPolicy(32, 8, 8, 2, pruning_mode="per_layer_head"))
    prompts = prompts_of(44, 5, seed=2)
    monkeypatch.setattr(engine, "eos_token_ids", lambda: set())
    free = generate_batch(engine, prompts, s, SamplingParams(max_tokens=30, temperature=0))
    assert all(len(r.token_ids) == 30 for r in free)
    # EOS: row 0's 4th token and row 1's 12th; a stop string: two characters of row 2's text past its 20th char
    eos = {free[0].token_ids[3], free[1].token_ids[11]}
    stop = free[2].text[20:22]
    params = SamplingParams(max_tokens=30, temperature=0, stop=[stop])
    monkeypatch.setattr(engine, "eos_token_ids", lambda: eos)
    alone = [single(engine, p, s, params) for p in prompts]
    seen = watch_forwards(engine, monkeypatch)
    results = generate_batch(engine, prompts, s, params)
    for i, (r, (tokens, text, finish, metrics, _)) in enumerate(zip(results, alone)):
        assert (r.token_ids, r.finish_reason, r.metrics) == (tokens, finish, metrics)
        if i == 2:  # cut before the whole stop string (Session's stream already showed the part in earlier deltas)
            full = engine.tokenizer.decode(tokens, skip_special_tokens=False)
            assert full.startswith(r.text + stop) and stop not in r.text and text.startswith(r.text)
        else:
            assert r.text == text
    lengths = [len(r.token_ids) for r in results]
    assert lengths[0] <= 4 and lengths[1] <= 12 and results[2].finish_reason == "stop"
    assert "length" in {r.finish_reason for r in results} and len(set(lengths)) >= 3
    decode = [(rows, start) for rows, start, _ in seen if start >= len(prompts[0])]
    # decode step k feeds the k-th sampled token of exactly the rows that sampled more than k tokens
    assert decode == [(sum(n > k for n in lengths), len(prompts[0]) + k - 1) for k in range(1, max(lengths))]
    assert all(rows == len(prompts) for rows, start, _ in seen if start < len(prompts[0]))
    assert all({shape[0] for shape in shapes} == {rows} for rows, _, shapes in seen)  # the cache shrinks too


@pytest.mark.parametrize("mode", ["per_layer_head", "per_head", "global"])
@pytest.mark.parametrize("method", METHODS)
def test_retained_kv_never_exceeds_budget_plus_divide_length_per_row(method, mode, engine, monkeypatch):
    budget, divide = 32, 8
    s = settings(engine, method, BudgetPolicy(budget, divide, 8, 2, pruning_mode=mode))
    prompts = prompts_of(4 * budget, 3, seed=3)  # several times the budget
    seen = watch_forwards(engine, monkeypatch)
    kept_sizes = set()
    results = generate_batch(engine, prompts, s, SamplingParams(max_tokens=30, temperature=0.8, seed=1),
                             on_round=lambda row, record: kept_sizes.update(len(p) for _, _, p in record.kept))
    for rows, _, shapes in seen:
        assert len(shapes) == 1  # every layer holds the same rows and slot count
        (b, _, t, _), = shapes
        assert b == rows and t <= budget + divide
    assert kept_sizes == {budget}
    for r in results:
        m = r.metrics
        assert m.peak_retained_tokens == budget + divide and m.retained_tokens <= budget + divide
        assert m.rounds == (m.logical_tokens - budget - divide) // divide + 1
        assert m.kv_bytes < m.kv_bytes_full


def test_prompts_of_different_lengths_are_a_user_error(engine):
    s = CompressionSettings(policy=None)
    with pytest.raises(UserError, match="same"):
        generate_batch(engine, [[5, 6, 7], [5, 6]], s, SamplingParams(max_tokens=4))
    with pytest.raises(UserError, match="same"):
        generate_batch(engine, [[], []], s, SamplingParams(max_tokens=4))
    assert generate_batch(engine, [], s, SamplingParams(max_tokens=4)) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_on_cuda(dtype, tiny_model_factory):
    """On a GPU (skipped elsewhere): every method runs batched within B + N per row. In float32 each row gives the
    tokens of its prompt alone; in bfloat16, where batched and single kernels round differently, most rows do."""
    engine = load_engine(str(tiny_model_factory("qwen3")), device="cuda", dtype=dtype)
    policy = BudgetPolicy(32, 8, 8, 2, pruning_mode="per_layer_head")
    prompts = prompts_of(50, 4)
    params = SamplingParams(max_tokens=40, temperature=0)
    for method in [*METHODS, FULL]:
        s = settings(engine, method, policy)
        results, rounds = batched(engine, prompts, s, params)
        same = 0
        for i, prompt in enumerate(prompts):
            tokens, text, finish, metrics, kept = single(engine, prompt, s, params)
            same += results[i].token_ids == tokens and rounds[i] == kept
            if method != FULL:
                assert results[i].metrics.peak_retained_tokens == 40 and len(rounds[i]) >= 2
        print(f"cuda {dtype} {method}: {same}/{len(prompts)} rows as alone")
        assert same == len(prompts) if dtype == "float32" else same >= len(prompts) // 2, method


@pytest.mark.parametrize("mode", ["per_head", "per_layer_head"])
def test_a_batch_on_the_static_cache_runner_equals_the_transformers_path(mode, tiny_model_factory):
    """generate_batch on the bounded static-cache runner (rounds planned on its device for every row at once):
    the same tokens and kept positions as on transformers' cache with rounds planned row by row on the host."""
    from triattn_local.backends.torch.engine import TorchEngine
    from triattn_local.backends.torch.static_runner import StaticRunner

    path = str(tiny_model_factory("qwen3"))
    static = TorchEngine(path, device="cpu", dtype="float32", static_cache=True)
    dynamic = TorchEngine(path, device="cpu", dtype="float32", static_cache=False)
    policy = BudgetPolicy(32, 8, 8, 2, pruning_mode=mode)
    prompts = prompts_of(50, 3)
    params = SamplingParams(max_tokens=30, temperature=0)
    s = settings(static, "triattention", policy)
    from triattn_local.scorer import TriAttentionScorer

    assert isinstance(static.new_runner(TriAttentionScorer(s.stats), policy.capacity), StaticRunner)
    got, got_rounds = batched(static, prompts, s, params)
    want, want_rounds = batched(dynamic, prompts, settings(dynamic, "triattention", policy), params)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert got_rounds == want_rounds and all(len(r) >= 2 for r in got_rounds.values())
