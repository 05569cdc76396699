"""The bounded static-cache runner (the CUDA fast path) against the transformers path, run here on the CPU.

Same weights, same stats, same policy: the same greedy tokens, the same kept positions in every round, and a cache
that never holds more than B + N slots. On the device the same tests run with CUDA graphs and Triton kernels
(TRIATTN_TEST_DEVICE=cuda)."""

import os

import numpy as np
import pytest
import torch

from test_torch_backend import synthetic_stats
from triattn_local.backends.torch.engine import TorchEngine
from triattn_local.backends.torch.static_runner import StaticRunner
from triattn_local.engine import CompressionEvent, CompressionSettings, TokenEvent
from triattn_local.policy import BudgetPolicy
from triattn_local.sampling import SamplingParams

DEVICE = os.environ.get("TRIATTN_TEST_DEVICE", "cpu")
ARCHS = ["qwen3", "qwen2", "llama"]


def run(engine, prompt, policy, n):
    session = engine.session(CompressionSettings(policy, synthetic_stats(engine.shape)))
    lengths = []
    if isinstance(session.runner.runner, StaticRunner):
        runner = session.runner.runner
        forward = runner.forward

        def watched(ids, start):
            out = forward(ids, start)
            lengths.append(runner.length)
            return out

        runner.forward = watched
    tokens, kept = [], []
    for ev in session.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0)):
        if isinstance(ev, TokenEvent):
            tokens.append(ev.token_id)
        elif isinstance(ev, CompressionEvent):
            kept.append(ev.record.kept)
    return tokens, kept, lengths, session


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["per_layer_head", "per_head", "global"])
def test_static_runner_keeps_what_the_transformers_path_keeps(arch, mode, tiny_model_factory):
    path = str(tiny_model_factory(arch))
    dtype = "float32"
    static = TorchEngine(path, device=DEVICE, dtype=dtype, static_cache=True)
    dynamic = TorchEngine(path, device=DEVICE, dtype=dtype, static_cache=False)
    prompt = [int(x) for x in np.random.default_rng(0).integers(5, 300, size=160)]
    policy = BudgetPolicy(40, 16, 8, 2, pruning_mode=mode)
    tokens_s, kept_s, lengths, session = run(static, prompt, policy, 70)
    tokens_d, kept_d, _, _ = run(dynamic, prompt, policy, 70)
    assert isinstance(session.runner.runner, StaticRunner)
    assert len(kept_s) >= 5
    assert tokens_s == tokens_d
    assert kept_s == kept_d
    assert max(lengths) == policy.capacity == session.runner.runner.model.capacity  # never more than B + N


@pytest.mark.parametrize("arch", ARCHS)
def test_static_runner_without_rounds_equals_full_attention(arch, tiny_model_factory):
    path = str(tiny_model_factory(arch))
    static = TorchEngine(path, device=DEVICE, dtype="float32", static_cache=True)
    prompt = list(range(5, 70))
    tokens, kept, _, session = run(static, prompt, BudgetPolicy(4096, 16, 8), 50)
    full = static.session(CompressionSettings(policy=None))
    ref = [ev.token_id for ev in full.generate(prompt, SamplingParams(max_tokens=50, temperature=0.0))
           if isinstance(ev, TokenEvent)]
    assert kept == [] and isinstance(session.runner.runner, StaticRunner)
    assert tokens == ref


def test_compaction_moves_kept_slots_to_the_front(tiny_model_factory):
    engine = TorchEngine(str(tiny_model_factory("llama")), device=DEVICE, dtype="float32", static_cache=True)
    runner = engine.new_runner(TriAttentionScorerFor(engine), capacity=64)
    runner.forward([list(range(5, 45))], 0)
    before = runner.model.k_cache[:, :, :, :40].clone()
    rng = np.random.default_rng(0)
    layers, heads = engine.shape.num_layers, engine.shape.num_kv_heads
    keep = np.sort(np.stack([np.stack([rng.choice(40, 32, replace=False) for _ in range(heads)])
                             for _ in range(layers)]), -1)[None]
    runner.compact(keep)
    assert runner.length == 32
    for i in range(layers):
        for h in range(heads):
            assert torch.equal(runner.model.k_cache[i, 0, h, :32], before[i, 0, h, keep[0, i, h]])


def TriAttentionScorerFor(engine):
    from triattn_local.scorer import TriAttentionScorer

    return TriAttentionScorer(synthetic_stats(engine.shape))


@pytest.mark.parametrize("mode", ["per_layer_head", "per_head", "global"])
def test_batched_rounds_on_the_device_equal_the_host_plan(mode, tiny_model_factory):
    """StaticRunner.compress (the policy's torch form) keeps what each row's CompressionState.plan would."""
    from triattn_local.compression import CompressionState
    from triattn_local.scorer import TriAttentionScorer

    engine = TorchEngine(str(tiny_model_factory("qwen3")), device=DEVICE, dtype="float32", static_cache=True)
    policy = BudgetPolicy(40, 16, 8, 2, pruning_mode=mode)
    scorer = TriAttentionScorer(synthetic_stats(engine.shape))
    shape = engine.shape
    runner = engine.new_runner(scorer, capacity=policy.capacity)
    prompts = np.random.default_rng(1).integers(5, 300, size=(3, policy.capacity))
    runner.forward(prompts, 0)
    states = [CompressionState(policy, scorer, shape.num_layers, shape.num_kv_heads) for _ in range(3)]
    for s in states:
        s.appended(policy.capacity)
    scores = runner.head_scores(scorer, states[0].round_start)
    k_before = runner.model.k_cache.clone()
    host = [CompressionState(policy, scorer, shape.num_layers, shape.num_kv_heads) for _ in range(3)]
    for s in host:
        s.appended(policy.capacity)
    want = [s.plan(row) for s, row in zip(host, scores)]
    records = runner.compress(states, scorer)
    assert [r.kept for r in records] == [w[1].kept for w in want]
    for b, (keep, _) in enumerate(want):
        for i in range(shape.num_layers):
            for h in range(shape.num_kv_heads):
                assert torch.equal(runner.model.k_cache[i, b, h, :policy.budget], k_before[i, b, h, keep[i, h]])
    assert all(np.array_equal(s.positions, h.positions) for s, h in zip(states, host))


def test_a_session_round_can_be_recorded_after_the_next_step_is_queued(tiny_model_factory):
    """Session.appended_later (the batched server's form): the round's compaction is queued at once (the cache holds
    the budget, so the next step can be launched), its record waits for the function returned, and both give what
    appended gives in one go."""
    from triattn_local.engine import CompressionSettings

    engine = TorchEngine(str(tiny_model_factory("qwen3")), device=DEVICE, dtype="float32", static_cache=True)
    policy = BudgetPolicy(40, 16, 8, 2)
    settings = CompressionSettings(policy, stats=synthetic_stats(engine.shape))
    prompt = [int(x) for x in np.random.default_rng(2).integers(5, 300, size=policy.capacity)]
    now, later = engine.session(settings), engine.session(settings)
    for session in (now, later):
        session.runner.forward(prompt, 0)
    events_now = now.appended(policy.capacity)
    finish = later.appended_later(policy.capacity)
    assert later.runner.runner.length == policy.budget and later.state.rounds == 0  # compacted, not yet recorded
    events_later = finish()
    assert later.state.rounds == 1 and len(events_now) == len(events_later) == 1
    assert events_later[0].record.kept == events_now[0].record.kept
    assert np.array_equal(later.state.positions, now.state.positions)
    assert torch.equal(later.runner.runner.model.k_cache[..., :policy.budget, :],
                       now.runner.runner.model.k_cache[..., :policy.budget, :])
    assert later.appended_later(1)() == []  # no round due: nothing to record


@pytest.mark.skipif(DEVICE != "cpu", reason="on the GPU every test above already runs the kernels")
@pytest.mark.parametrize("arch,mode", [("qwen3", "per_head"), ("llama", "per_layer_head")])
def test_the_kernel_path_keeps_what_the_transformers_path_keeps(arch, mode, tiny_model_factory, monkeypatch):
    """The GPU's code path in Triton's interpreter: fused decode steps, all-layer scoring and compaction kernels."""
    pytest.importorskip("triton")
    from triattn_local.backends.torch import kernels

    path = str(tiny_model_factory(arch))
    policy = BudgetPolicy(40, 16, 8, 2, pruning_mode=mode)
    prompt = [int(x) for x in np.random.default_rng(0).integers(5, 300, size=60)]
    tokens_d, kept_d, _, _ = run(TorchEngine(path, device="cpu", dtype="float32", static_cache=False), prompt,
                                 policy, 40)
    monkeypatch.setattr(kernels, "available", lambda device: True)
    tokens_s, kept_s, lengths, session = run(TorchEngine(path, device="cpu", dtype="float32", static_cache=True),
                                             prompt, policy, 40)
    runner = session.runner.runner
    assert runner.use_kernels and runner.model.fused_decode
    assert len(kept_s) >= 3
    assert tokens_s == tokens_d
    assert kept_s == kept_d
    assert max(lengths) == policy.capacity


def test_full_attention_runs_on_the_growing_static_cache(tiny_model_factory, monkeypatch):
    """--no-compress on the static path (CUDA) uses the same fast runner with a cache that grows, and gives
    transformers' greedy tokens."""
    path = str(tiny_model_factory("qwen3"))
    monkeypatch.setattr(StaticRunner, "initial_capacity", 16)  # grow (copying the filled slots) several times
    static = TorchEngine(path, device=DEVICE, dtype="float32", static_cache=True)
    dynamic = TorchEngine(path, device=DEVICE, dtype="float32", static_cache=False)
    prompt = list(range(5, 40))

    def full(engine):
        session = engine.session(CompressionSettings(policy=None))
        tokens = [ev.token_id for ev in session.generate(prompt, SamplingParams(max_tokens=60, temperature=0.0))
                  if isinstance(ev, TokenEvent)]
        return tokens, session.runner.runner

    tokens_s, runner = full(static)
    tokens_d, _ = full(dynamic)
    assert isinstance(runner, StaticRunner) and runner.grows and runner.capacity >= len(prompt) + 60
    assert tokens_s == tokens_d
