"""Continuous batching (continuous.py over the torch RowBatch), on the static runner's CPU path: sequences that
join at different times, with prompts of different lengths and their own compression rounds, give the tokens and
the kept positions each gives alone; rows are reused; spare lanes touch nobody's cache. On the device the same
tests run with CUDA graphs and the Triton kernels (TRIATTN_TEST_DEVICE=cuda)."""

import os

import numpy as np
import pytest
import torch

from test_torch_backend import synthetic_stats
from triattn_local.backends.torch.engine import TorchEngine
from triattn_local.continuous import ContinuousBatch
from triattn_local.engine import CompressionEvent, CompressionSettings, DoneEvent, TextEvent, TokenEvent
from triattn_local.policy import BudgetPolicy
from triattn_local.sampling import SamplingParams

DEVICE = os.environ.get("TRIATTN_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def engine(tiny_model_factory):
    return TorchEngine(str(tiny_model_factory("qwen3")), device=DEVICE, dtype="float32", static_cache=True)


def settings(engine, mode="per_head"):
    if mode == "full":  # full attention: a row holds the whole context
        return CompressionSettings(policy=None)
    return CompressionSettings(BudgetPolicy(40, 16, 8, 0, pruning_mode=mode), synthetic_stats(engine.shape))


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(x) for x in rng.integers(5, 300, size=int(length))] for length in rng.integers(3, 150, size=n)]


def collect(events, result=([], [], "", None)):
    """(tokens, kept positions of each round, text, DoneEvent) after these events, continuing `result`."""
    tokens, kept, text, done = result
    for ev in events:
        if isinstance(ev, TokenEvent):
            tokens = tokens + [ev.token_id]
        elif isinstance(ev, CompressionEvent):
            kept = kept + [ev.record.kept]
        elif isinstance(ev, TextEvent):
            text += ev.text
        elif isinstance(ev, DoneEvent):
            done = ev
    return tokens, kept, text, done


def alone(engine, prompt, params, mode="per_head"):
    return collect(engine.session(settings(engine, mode)).generate(prompt, params))


def run_batched(batch, jobs, arrive):
    """jobs: (prompt, params); arrive[i]: the decode step before which job i starts (when a row is free).
    Steps as a server does: one prefill chunk of one starting sequence, then one decode step for all."""
    results = {i: collect([]) for i in range(len(jobs))}
    live, waiting, step = {}, list(range(len(jobs))), 0
    while waiting or live:
        for i in [i for i in waiting if arrive[i] <= step]:
            seq = batch.start(*jobs[i])
            if seq is None:
                break
            waiting.remove(i)
            live[seq] = i
        prefilling = [s for s in live if s.prefill is not None]
        events = {}
        if prefilling:
            events[prefilling[0]] = batch.prefill_step(prefilling[0])
        for seq, evs in batch.decode_step(list(live)).items():
            events.setdefault(seq, []).extend(evs)
        for seq, evs in events.items():
            if seq.done:
                evs += batch.finish(seq)
            results[live[seq]] = collect(evs, results[live[seq]])
            if seq.done:
                del live[seq]
        step += 1
    return [results[i] for i in range(len(jobs))]


@pytest.mark.parametrize("mode", ["per_head", "per_layer_head", "global", "full"])
def test_each_sequence_decodes_as_it_would_alone(engine, mode):
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (60, 25, 70, 5, 45)]
    jobs = list(zip(prompts(5), params))
    batch = ContinuousBatch.create(engine, settings(engine, mode), rows=3)
    got = run_batched(batch, jobs, arrive=[0, 0, 7, 9, 30])
    for (prompt, p), (tokens, kept, text, done) in zip(jobs, got):
        want_tokens, want_kept, want_text, want_done = alone(engine, prompt, p, mode)
        assert tokens == want_tokens
        assert kept == want_kept
        assert text == want_text
        assert (done.finish_reason, done.generated_tokens) == (want_done.finish_reason, want_done.generated_tokens)
        assert done.metrics.rounds == want_done.metrics.rounds
    if mode == "full":
        assert batch.rows.capacity == engine.context_length and not any(kept for _, kept, _, _ in got)
    else:
        assert sum(len(kept) for _, kept, _, _ in got) >= 10  # rounds in prefill and in batched decode
    assert batch.rows.in_use() == 0  # every row freed


def test_full_attention_batches_only_where_two_whole_contexts_fit(engine):
    from triattn_local.backends.torch.row_batch import row_bytes

    per_row = row_bytes(engine.static_model(), engine.context_length)
    assert ContinuousBatch.create(engine, settings(engine, "full"), rows=8, kv_memory=3 * per_row - 1) is None
    batch = ContinuousBatch.create(engine, settings(engine, "full"), rows=8, kv_memory=3 * per_row)
    assert batch.capacity == 2 and batch.rows.capacity == engine.context_length
    tri = ContinuousBatch.create(engine, settings(engine), rows=8, kv_memory=3 * per_row - 1)
    assert tri.capacity == 8  # B + N slots a row: the same memory holds every row asked for


def test_rows_bound_the_batch_and_are_reused(engine):
    batch = ContinuousBatch.create(engine, settings(engine), rows=2)
    params = SamplingParams(max_tokens=3, temperature=0.0)
    a, b = batch.start([5, 6, 7], params), batch.start([8, 9], params)
    assert a is not None and b is not None and batch.start([10], params) is None
    assert {a.runner.row, b.runner.row} == {0, 1}
    batch.finish(a, "cancelled")
    c = batch.start([10, 11], params)
    assert c is not None and c.runner.row == a.runner.row


def test_spare_lanes_write_only_the_scratch_row(engine):
    """Three sequences decoding in a step of four lanes (a padded CUDA graph): the spare lane writes the scratch
    row, and a sequence that is not decoding (its prefill done, say) keeps its cache as it was."""
    batch = ContinuousBatch.create(engine, settings(engine), rows=4)
    rows = batch.rows
    rows.use_graph = True  # lanes padded to powers of two as on a GPU (the capture itself is skipped on a CPU)
    seqs = [batch.start(p, SamplingParams(max_tokens=50, temperature=0.0)) for p in prompts(4, seed=1)]
    for seq in seqs:
        while seq.prefill is not None:
            batch.prefill_step(seq)
    idle = seqs[3]
    idle.decoding = False
    before = rows.model.k_cache[:, idle.runner.row].clone()
    assert rows.lanes_for(3) == 4
    assert len(batch.decode_step(seqs)) == 3
    assert torch.equal(rows.model.k_cache[:, idle.runner.row], before)
    assert [s.session.logical for s in seqs] == [len(p) + (s is not idle) for s, p in zip(seqs, prompts(4, seed=1))]


def test_one_token_prompt_and_one_token_answer_end_at_prefill(engine):
    batch = ContinuousBatch.create(engine, settings(engine), rows=2)
    seq = batch.start([7], SamplingParams(max_tokens=1, temperature=0.0))
    events = batch.prefill_step(seq)
    assert seq.done and not seq.decoding and [e for e in events if isinstance(e, TokenEvent)]
    assert batch.decode_step([seq]) == {}
    done = batch.finish(seq)[-1]
    assert done.finish_reason == "length" and done.generated_tokens == 1
    assert batch.rows.in_use() == 0


@pytest.mark.parametrize("mode", ["per_head", "full"])
def test_the_server_batches_concurrent_requests_and_answers_as_one_at_a_time(engine, mode):
    """`triattn serve` on the static path: concurrent requests with prompts of different lengths decode in batched
    steps; each greedy answer equals the one the round-robin scheduler gives (TriAttention and full attention)."""
    import threading

    from fastapi.testclient import TestClient

    from triattn_local.serve.app import ServeOptions, ServerState, create_app
    from triattn_local.serve.scheduler import BatchedScheduler, Scheduler

    def serve(batched: bool):
        state = ServerState(ServeOptions(served_name="tiny", parallel=3, allowed_hosts=None, max_conversations=4))
        if not batched:
            engine.new_row_batch = lambda *a, **k: None  # the engine's own method hidden: the round-robin path
        try:
            state.attach(engine, settings(engine, mode))
        finally:
            engine.__dict__.pop("new_row_batch", None)
        assert isinstance(state.scheduler, BatchedScheduler) is batched
        assert isinstance(state.scheduler, Scheduler)
        return state, TestClient(create_app(state))

    texts = ["alpha beta gamma " * k for k in (1, 9, 4, 13, 2)]
    bodies = [{"model": "tiny", "prompt": t, "max_tokens": 12 + 9 * i, "temperature": 0} for i, t in enumerate(texts)]
    answers = {}
    for batched in (False, True):
        state, client = serve(batched)
        got, steps = {}, []
        if batched:  # count the sequences of each batched step
            decode = state.scheduler.batch.decode_step
            state.scheduler.batch.decode_step = lambda seqs: steps.append(len(seqs)) or decode(seqs)

        def ask(i):
            r = client.post("/v1/completions", json=bodies[i])
            assert r.status_code == 200, r.text
            got[i] = (r.json()["choices"][0]["text"], r.json()["usage"]["completion_tokens"])

        with client:
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            state.scheduler.stop()
        answers[batched] = got
        if batched:
            assert max(steps) > 1  # requests shared decode steps
            assert state.scheduler.batch.rows.in_use() == 0
    assert answers[True] == answers[False] and len(answers[True]) == len(bodies)


def test_a_cancelled_request_leaves_the_batch_and_frees_its_row(engine):
    import asyncio

    from triattn_local.serve.conversations import SnapshotStore
    from triattn_local.serve.scheduler import BatchedScheduler, Job

    loop = asyncio.new_event_loop()
    try:
        batch = ContinuousBatch.create(engine, settings(engine), rows=2)
        scheduler = BatchedScheduler(engine, settings(engine), SnapshotStore(0, 0), batch, parallel=8)
        assert scheduler.parallel == 2  # no more requests run than the batch has rows
        jobs = [Job(p, SamplingParams(max_tokens=40, temperature=0.0), False, loop) for p in prompts(2, seed=4)]
        for job in jobs:
            scheduler._start(job)
            scheduler.active.append(job)
        while not all(job.seq.decoding for job in jobs):
            scheduler._turn()
        jobs[0].cancel()
        scheduler._turn()
        assert scheduler.active == [jobs[1]] and batch.rows.in_use() == 1 and jobs[0].session is None
        while scheduler.active:
            scheduler._turn()
        assert batch.rows.in_use() == 0 and len(jobs[1].seq.stream.tokens) == 40
    finally:
        loop.close()


def test_the_serving_benchmark_runs_and_reports_every_configuration(tmp_path):
    """benchmarks/serve_batching.py on a tiny shape on the CPU: the memory cap admits what it holds (full KV needs
    more slots a stream, so fewer rows), every stream is served, rounds happen only with TriAttention; the round
    profile times its rounds and profiles one more."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "serve.jsonl"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_batching.py"
    subprocess.run([sys.executable, str(script), "--shape", "tiny", "--device", "cpu", "--streams", "4",
                    "--kv-memory", "0.0003", "--prompt", "60", "--output", "300", "--budget", "40",
                    "--divide-length", "16", "--window", "8", "--seconds", "120", "--out", str(out),
                    "--methods", "triattention,full,transformers", "--round-profile"],
                   check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    rows = list(map(json.loads, out.read_text().splitlines()))
    profile = next(line for line in rows if line.get("kind") == "round_profile")
    assert profile["rounds"] == 8 and profile["profiled"] and profile["ms_per_round"] > 0
    lines = {line["method"]: line for line in rows if "method" in line}
    tri, full = lines["triattention"], lines["full"]
    assert tri["rows"] == 4 and full["rows"] < 4  # 56 vs 361 slots a stream under the same cap
    assert tri["generated"] == full["generated"] == 4 * 300
    assert tri["rounds"] > 0 and full["rounds"] == 0
    assert tri["mean_lanes"] > full["mean_lanes"]
    hf = lines["transformers"]  # static batches of what the cap holds at full KV: every stream, in waves
    assert full["rows"] <= hf["rows"] < 4 and hf["generated"] == 4 * 300 and hf["streams_started"] == 4
    assert hf["ttft_p95_s"] > hf["ttft_p50_s"]  # the streams of the second wave waited for the first


def test_with_the_triton_kernels_each_sequence_still_decodes_as_alone(engine, monkeypatch):
    """The GPU's code path in Triton's interpreter: fused lane kernels for the batched step, and the scoring and
    compaction kernels on each row's view of the shared buffers (strided across rows)."""
    from triattn_local.backends.torch import kernels

    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (30, 12, 35)]
    jobs = list(zip(prompts(3, seed=2), params))
    want = [alone(engine, prompt, p) for prompt, p in jobs]  # the torch forms, one sequence at a time
    monkeypatch.setattr(kernels, "available", lambda device: True)
    batch = ContinuousBatch.create(engine, settings(engine), rows=2)
    assert batch.rows.model.fused_decode
    got = run_batched(batch, jobs, arrive=[0, 3, 5])
    for (tokens, kept, text, done), (w_tokens, w_kept, w_text, w_done) in zip(got, want):
        assert tokens == w_tokens and kept == w_kept and text == w_text
    assert sum(len(kept) for _, kept, _, _ in got) >= 5


def test_prefix_reuse_under_continuous_batching(engine):
    """A kept snapshot restores into a batch row: the second request that shares a long prefix is served from it and
    answers as it does cold (greedy)."""
    from fastapi.testclient import TestClient

    from triattn_local.serve.app import ServeOptions, ServerState, create_app
    from triattn_local.serve.scheduler import BatchedScheduler

    def ask(client, prompt):
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 20,
                                                 "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        return body["choices"][0]["text"], (body["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)

    shared = "the ledger of the harbour " * 60
    answers = []
    for keep in (4, 0):  # with snapshots, then cold
        state = ServerState(ServeOptions(served_name="tiny", parallel=2, allowed_hosts=None, max_conversations=keep))
        state.attach(engine, settings(engine))
        assert isinstance(state.scheduler, BatchedScheduler)
        with TestClient(create_app(state)) as client:
            answers.append([ask(client, shared + tail) for tail in ("first question", "second question")])
            state.scheduler.stop()
    (first, second), (cold_first, cold_second) = answers
    assert second[1] >= 256 and first[1] == 0 and cold_second[1] == 0  # served from the first request's snapshot
    assert (first[0], second[0]) == (cold_first[0], cold_second[0])
