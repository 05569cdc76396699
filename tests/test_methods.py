"""The baseline methods (SnapKV, R-KV, StreamingLLM, H2O) behind the same budget policy as TriAttention."""

import numpy as np
import pytest
import torch

from test_cli import assert_one_line_error, triattn
from test_torch_backend import synthetic_stats, watch_cache_sizes
from triattn_local.backends import load_engine
from triattn_local.backends.torch.methods import BASELINES, key_redundancy, rkv_scores
from triattn_local.engine import CompressionEvent, CompressionSettings, TokenEvent
from triattn_local.errors import UserError
from triattn_local.methods import METHODS, STREAMING_SINKS, BaselineScorer, make_scorer
from triattn_local.policy import BudgetPolicy
from triattn_local.sampling import SamplingParams

MODES = ["per_layer_head", "per_head", "global"]
ARCHS = ["qwen3", "qwen2", "llama"]


def settings(engine, policy, method):
    stats = synthetic_stats(engine.shape) if method == "triattention" and policy else None
    return CompressionSettings(policy=policy, stats=stats, method=method)


def run(engine, prompt, policy, method, n, temperature=0.0, seed=None):
    session = engine.session(settings(engine, policy, method))
    tokens, rounds = [], []
    for ev in session.generate(prompt, SamplingParams(max_tokens=n, temperature=temperature, seed=seed)):
        if isinstance(ev, TokenEvent):
            tokens.append(ev.token_id)
        elif isinstance(ev, CompressionEvent):
            rounds.append(ev.record)
    return tokens, rounds, session


def eager_attentions(path, ids):
    """Attention probabilities [layers][H, T, T] of a full causal forward, from transformers' eager attention."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager")
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    return [a[0].numpy() for a in out.attentions]


def test_registry_covers_every_baseline():
    assert set(BASELINES) | {"triattention"} == set(METHODS)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_retained_kv_never_exceeds_budget_plus_divide_length(method, mode, tiny_model_factory):
    engine = load_engine(str(tiny_model_factory("qwen3")), device="cpu")
    budget, divide = 48, 16
    prompt = [int(x) for x in np.random.default_rng(0).integers(5, 300, size=5 * budget)]
    session = engine.session(settings(engine, BudgetPolicy(budget, divide, 8, 2, pruning_mode=mode), method))
    sizes = watch_cache_sizes(session)
    done = list(session.generate(prompt, SamplingParams(max_tokens=40, temperature=0.8, seed=1)))[-1]
    assert max(shape[2] for s in sizes for shape in s) <= budget + divide
    assert all(len(s) == 1 for s in sizes)
    assert done.metrics.peak_retained_tokens == budget + divide
    assert done.metrics.rounds == (done.metrics.logical_tokens - budget - divide) // divide + 1
    if session.runner.recorder is not None:  # the recorder follows the cache
        for i, layer in enumerate(session.runner.cache.layers):
            got = session.runner.recorder.queries[i] if method != "h2o" else session.runner.recorder.received[i]
            assert got.shape[1] == (8 if method != "h2o" else layer.keys.shape[2])


@pytest.mark.parametrize("arch", ARCHS)
def test_budget_above_the_sequence_is_full_attention(arch, tiny_model_factory):
    """No round ever runs: every method gives the tokens of full attention, and recording changes no logits."""
    path = str(tiny_model_factory(arch))
    prompt = list(range(5, 70))
    full, _, _ = run(load_engine(path, device="cpu"), prompt, None, "triattention", 40)  # engine never captured
    engine = load_engine(path, device="cpu")
    for method in METHODS:
        tokens, rounds, _ = run(engine, prompt, BudgetPolicy(budget=4096, divide_length=16, window=32), method, 40)
        assert rounds == [] and tokens == full, method
    assert run(engine, prompt, None, "triattention", 40)[0] == full  # --no-compress on the captured engine


def test_snapkv_scores_equal_pooled_attention_of_a_full_eager_forward(tiny_model_factory):
    path = tiny_model_factory("qwen3")
    engine = load_engine(str(path), device="cpu")
    prompt = [int(x) for x in np.random.default_rng(1).integers(5, 300, size=70)]
    session = engine.session(settings(engine, BudgetPolicy(4096, 16, window=40), "snapkv"))
    list(session._feed(prompt))  # in chunks of 16, as under compression
    assert session.scorer.obs_window == 32
    got = session.runner.head_scores(session.scorer, session.state.round_start)  # [L, H, T]
    for layer, attn in enumerate(eager_attentions(path, prompt)):
        summed = attn[:, -32:, :].sum(axis=1)  # [H, T]
        pooled = np.stack([summed[:, max(0, j - 3):j + 4].max(axis=1) for j in range(len(prompt))], axis=1)
        np.testing.assert_allclose(got[layer], pooled, rtol=1e-4, atol=1e-5)


def test_observation_window_is_capped_by_the_recent_window(tiny_model_factory):
    engine = load_engine(str(tiny_model_factory("qwen3")), device="cpu")
    assert engine.session(settings(engine, BudgetPolicy(64, 16, window=8), "rkv")).scorer.obs_window == 8
    assert engine.session(settings(engine, BudgetPolicy(64, 16, window=0), "snapkv")).scorer.obs_window == 1


def test_h2o_accumulates_the_attention_every_key_received(tiny_model_factory):
    path = tiny_model_factory("qwen3")
    engine = load_engine(str(path), device="cpu")
    prompt = [int(x) for x in np.random.default_rng(2).integers(5, 300, size=40)]
    tokens, _, session = run(engine, prompt, BudgetPolicy(4096, 16, window=8), "h2o", 12)
    seen = prompt + tokens[:-1]  # the last sampled token was never fed
    for layer, attn in enumerate(eager_attentions(path, seen)):
        got = session.runner.recorder.received[layer].numpy()
        np.testing.assert_allclose(got, attn.sum(axis=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["per_layer_head", "global"])
@pytest.mark.parametrize("policy_sinks", [0, 6])
def test_streaming_keeps_exactly_the_sinks_and_the_newest(mode, policy_sinks, tiny_model_factory):
    """StreamingLLM keeps its own 4 sinks with the default policy (no sinks), and the policy's when it has more."""
    engine = load_engine(str(tiny_model_factory("llama")), device="cpu")
    budget, sinks = 32, max(policy_sinks, STREAMING_SINKS)
    prompt = [int(x) for x in np.random.default_rng(3).integers(5, 300, size=100)]
    policy = BudgetPolicy(budget, 8, 4, policy_sinks, pruning_mode=mode)
    _, rounds, _ = run(engine, prompt, policy, "streaming", 30)
    assert len(rounds) >= 5
    for record in rounds:
        expected = list(range(sinks)) + list(range(record.step - (budget - sinks), record.step))
        assert all(kept == expected for _, _, kept in record.kept)


def test_rkv_redundancy_lowers_the_score_of_a_duplicated_key():
    t, dim, obs = 40, 64, 4
    basis = np.linalg.qr(np.random.default_rng(4).normal(size=(dim, t)))[0].T  # t orthonormal keys
    keys = torch.tensor(basis[None], dtype=torch.float32)  # [1 KV head, T, D]
    keys[0, 9] = keys[0, 5]  # key 9 repeats key 5
    redundancy = key_redundancy(keys)[0]
    assert redundancy[5] == redundancy[9] and redundancy[5] > redundancy[0]
    others = [j for j in range(t) if j not in (5, 9)]
    assert torch.allclose(redundancy[others], redundancy[0].expand(len(others)))
    # zero queries attend uniformly, so before the observation window every key is equally important
    scores = rkv_scores(torch.zeros(2, obs, dim), keys, scaling=0.125)[:, : t - obs]  # [2 query heads, T - obs]
    for head in scores:
        assert head[5] < head[0] and head[9] < head[0]
        assert torch.allclose(head[[j for j in others if j < t - obs]], head[0])
    assert BaselineScorer("rkv", 2).rkv_lambda == 0.1


def test_unknown_method_is_a_user_error(tiny_model_factory):
    with pytest.raises(UserError, match="unknown method 'pyramid'"):
        CompressionSettings(method="pyramid")
    model = tiny_model_factory("qwen3")
    assert_one_line_error(triattn("run", model, "hi", "--method", "pyramid"), "unknown method", "snapkv")


def test_cli_runs_a_baseline_without_stats(tiny_model_factory, tmp_path):
    model = tiny_model_factory("qwen3")
    trace = tmp_path / "trace.jsonl"
    r = triattn("run", model, "Count to ten.", "--method", "snapkv", "--budget", "40", "--divide-length", "8",
                "--window", "4", "--max-tokens", "60", "--temperature", "0", "--kv-trace", trace, tmp_cache=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "calibrating" not in r.stderr and not (tmp_path / "stats").exists()
    summary = r.stderr.strip().splitlines()[-1]
    assert int(summary.split("peak KV ")[1].split()[0]) <= 48
    assert trace.read_text().strip()  # rounds ran


def test_max_offset_sets_the_future_queries_triattention_scores_for(tiny_model_factory):
    engine = load_engine(str(tiny_model_factory("qwen3")), device="cpu", dtype="float32")
    policy = BudgetPolicy(64, 16, 16, 4)
    stats = synthetic_stats(engine.shape)
    near = make_scorer(CompressionSettings(policy=policy, stats=stats, max_offset=512), engine.shape)
    far = make_scorer(CompressionSettings(policy=policy, stats=stats), engine.shape)
    assert list(near.offsets) == [2.0**i for i in range(10)]
    assert far.offsets[-1] == 65536
    keys = np.random.default_rng(0).standard_normal((engine.shape.num_kv_heads, 40, engine.shape.head_dim))
    assert not np.allclose(near.head_scores(0, keys, 100), far.head_scores(0, keys, 100))
