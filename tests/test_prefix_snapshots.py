"""Cache snapshots (Session.snapshot / restore) on every backend: a session restored from a snapshot taken at a cut
of the prompt continues with the same greedy tokens and the same kept positions as the uninterrupted session, and
the snapshot itself is left intact by the sessions that start from it. Budgets are small, so compression rounds
happen before and after the cut."""

import numpy as np
import pytest

from triattn_local.engine import BoundaryEvent, CompressionEvent, CompressionSettings, DoneEvent, TokenEvent
from triattn_local.policy import BudgetPolicy
from triattn_local.sampling import SamplingParams
from test_torch_backend import synthetic_stats

PROMPT = [int(x) for x in np.random.default_rng(3).integers(5, 300, size=150)]
CUTS = (37, 90, 121)  # 90: after two rounds; 121 is not a multiple of the divide length


def engine_for(kind: str, tiny_model_factory):
    path = str(tiny_model_factory("qwen3"))
    if kind == "mlx":
        pytest.importorskip("mlx_lm")
        from triattn_local.backends import load_engine

        return load_engine(path, backend="mlx", dtype="float32")
    from triattn_local.backends.torch.engine import TorchEngine

    return TorchEngine(path, device="cpu", dtype="float32", static_cache=kind == "static")


def run(session, prompt, cuts, n=16):
    """(tokens, kept positions per round, {cut: snapshot}, done)."""
    tokens, kept, snapshots, done = [], [], {}, None
    for ev in session.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0), cuts=cuts):
        if isinstance(ev, TokenEvent):
            tokens.append(ev.token_id)
        elif isinstance(ev, CompressionEvent):
            kept.append([p for _, _, p in ev.record.kept])
        elif isinstance(ev, BoundaryEvent):
            snapshots[ev.position] = session.snapshot()
        elif isinstance(ev, DoneEvent):
            done = ev
    return tokens, kept, snapshots, done


@pytest.mark.parametrize("kind", ["torch", "static", "mlx"])
def test_restored_snapshot_continues_like_the_uninterrupted_session(kind, tiny_model_factory):
    engine = engine_for(kind, tiny_model_factory)
    policy = BudgetPolicy(budget=32, divide_length=8, window=4, sinks=2, pruning_mode="per_head")
    settings = CompressionSettings(policy=policy, stats=synthetic_stats(engine.shape))
    cold_tokens, cold_kept, snapshots, cold_done = run(engine.session(settings), PROMPT, CUTS)
    assert sorted(snapshots) == list(CUTS) and all(s is not None for s in snapshots.values())
    snap = snapshots[90]
    assert snap.logical == 90 and snap.kv.rounds >= 2 and snap.kv.retained_tokens <= 32 + 8
    rounds_before = snap.kv.rounds
    for _ in range(2):  # twice: the first restored session must not have changed the snapshot
        warm = engine.session(settings)
        warm.restore(snap)
        tokens, kept, later, done = run(warm, PROMPT[90:], CUTS)
        assert tokens == cold_tokens
        assert kept == cold_kept[rounds_before:]
        assert done.metrics.logical_tokens == cold_done.metrics.logical_tokens
        assert done.metrics.retained_tokens == cold_done.metrics.retained_tokens
        assert list(later) == [121]  # only the cuts after the snapshot


def test_full_attention_snapshots_and_a_different_continuation(tiny_model_factory):
    """Without compression too; and a snapshot serves a prompt that shares only its prefix."""
    engine = engine_for("torch", tiny_model_factory)
    settings = CompressionSettings(policy=None)
    other = PROMPT[:37] + [7, 8, 9, 10, 11, 12]
    cold, _, _, _ = run(engine.session(settings), other, (37,))
    _, _, snapshots, _ = run(engine.session(settings), PROMPT, CUTS, n=2)
    warm = engine.session(settings)
    warm.restore(snapshots[37])
    assert run(warm, other[37:], (37,))[0] == cold


def test_no_snapshot_where_a_round_depended_on_the_whole_prompt(tiny_model_factory):
    engine = engine_for("torch", tiny_model_factory)
    policy = BudgetPolicy(budget=32, divide_length=8, window=4, sinks=2, protect_prefill=True)
    settings = CompressionSettings(policy=policy, stats=synthetic_stats(engine.shape))
    _, _, snapshots, _ = run(engine.session(settings), PROMPT, CUTS, n=2)
    assert snapshots == {37: None, 90: None, 121: None}


# ---- the server's snapshot store (serve/conversations.py) -------------------------------------------------------


def test_cuts_depend_on_the_ids_only_and_snapshots_sit_at_message_boundaries():
    from triattn_local.serve.conversations import SNAPSHOT_STRIDE, cut_points, snapshot_points

    end = 9
    ids = [5] * 10 + [end] + [6] * 600 + [end] + [7, 7]
    cuts = cut_points(ids, {end})
    assert cuts == [11, SNAPSHOT_STRIDE, 2 * SNAPSHOT_STRIDE, 612]
    assert [c for c in cut_points(ids[:300] + [8] * 400, {end}) if c <= 300] == [c for c in cuts if c <= 300]
    assert snapshot_points(ids, {end}, chat=True) == [11, 612]
    assert snapshot_points(ids, {end}, chat=False) == [612]
    assert snapshot_points(ids[:-2], {end}, chat=True) == [11]  # never at the very end: one token must be fed


def test_store_gives_the_longest_proper_prefix_and_forgets_the_least_recently_used():
    from triattn_local.serve.conversations import SnapshotStore

    store = SnapshotStore(max_snapshots=3, max_bytes=100)
    store.put([1, 2], "system", 10)
    store.put([1, 2, 3, 4], "turn 1", 10)
    store.put([1, 2, 9], "other", 10)
    m = store.match([1, 2, 3, 4, 5])
    assert (m.snapshot, m.cached) == ("turn 1", 4)
    assert store.match([1, 2, 3, 4]).snapshot == "system"  # a proper prefix only: one token is left to prefill
    assert store.match([7, 1, 2]) is None
    store.put([1, 2, 3, 4, 5, 6], "turn 2", 10)  # over the count: "other" (least recently used) goes
    assert store.match([1, 2, 9, 9]).snapshot == "system" and len(store) == 3
    assert store.has([1, 2, 3, 4, 5, 6]) and not store.has([1, 2, 9])
    store.put([3], "big", 85)  # over the bytes: the least recently used go until it fits
    assert store.total_bytes <= 100 and store.match([3, 4]).snapshot == "big"
    assert store.match([1, 2, 3, 4, 5, 6, 7]).snapshot == "turn 2"
    store.put([4], "too big", 101)
    assert not store.has([4])
    assert not SnapshotStore(0, 100).enabled and not SnapshotStore(4, 0).enabled


def test_llamacpp_restored_snapshot_continues_like_the_uninterrupted_session(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from test_llamacpp import STATS, convert

    from triattn_local.backends import load_engine

    engine = load_engine(str(convert("demo", tmp_path_factory.mktemp("demo-gguf"))), backend="llamacpp",
                         dtype="float32")
    policy = BudgetPolicy(budget=32, divide_length=8, window=4, sinks=2, pruning_mode="global")
    settings = CompressionSettings(policy=policy, stats=STATS)
    cold_tokens, cold_kept, snapshots, _ = run(engine.session(settings), PROMPT, CUTS)
    snap = snapshots[90]
    for _ in range(2):
        warm = engine.session(settings)
        warm.restore(snap)
        tokens, kept, _, _ = run(warm, PROMPT[90:], CUTS)
        assert tokens == cold_tokens and kept == cold_kept[snap.kv.rounds:]
        assert np.array_equal(warm.runner.cells(), np.sort(warm.state.positions[0, 0]))
