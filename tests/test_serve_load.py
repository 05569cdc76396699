"""Load: 8 concurrent streaming clients x 25 requests each against one server (the fair queue and the kept
conversations churning), all complete without errors and the server's memory stays flat."""

import threading
import time

import psutil
import pytest
from serve_helpers import CLI, start

CLIENTS, REQUESTS = 8, 25


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start(CLI + ["serve", "demo", "--budget", "128", "--divide-length", "32", "--window", "16", "--parallel", "4",
                     "--max-conversations", "4", "--temperature", "0.8"], tmp_path_factory, "serve-load")
    yield s
    s.stop()
    assert "Traceback" not in s.output()


def test_concurrent_streaming_clients(server):
    process = psutil.Process(server.pid)
    rss: list[tuple[int, int]] = []  # (requests finished so far, RSS bytes)
    finished, errors = [], []
    lock = threading.Lock()

    def client_loop(c: int):
        client = server.client()
        for r in range(REQUESTS):
            try:
                # prompts of varying length, some past the budget (compression rounds during prefill)
                content = f"{c}:{r} " + "0123456789" * ((c * 7 + r * 3) % 20)
                chunks = list(client.chat.completions.create(
                    model="demo", messages=[{"role": "user", "content": content}], max_tokens=4, stream=True,
                    stream_options={"include_usage": True}, seed=c * 1000 + r))
                finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
                usage = chunks[-1].usage
                assert finish and finish[0] in ("stop", "length"), finish
                assert 1 <= usage.completion_tokens <= 4 and usage.prompt_tokens > 0
            except Exception as e:  # reported below, with the client and request
                errors.append(f"client {c} request {r}: {type(e).__name__}: {e}")
            with lock:
                finished.append((c, r))
                rss.append((len(finished), process.memory_info().rss))

    t0 = time.time()
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    elapsed = time.time() - t0
    assert not errors, errors[:5]
    assert len(finished) == CLIENTS * REQUESTS

    m = server.metrics()
    assert m['triattn_requests_total{endpoint="/v1/chat/completions",status="200"}'] == CLIENTS * REQUESTS
    assert m["triattn_requests_running"] == 0 and m["triattn_requests_waiting"] == 0
    assert m["triattn_cache_snapshots"] <= 4
    assert m["triattn_compression_rounds_total"] > 0
    # memory: after the first quarter (allocator and caches warm), RSS does not keep growing
    warm = max(b for n, b in rss if n <= len(rss) // 4)
    late = max(b for n, b in rss if n > 3 * len(rss) // 4)
    print(f"\nload: {len(finished)} streamed requests in {elapsed:.1f} s; RSS after the first quarter "
          f"{warm / 2**20:.0f} MiB, in the last quarter at most {late / 2**20:.0f} MiB")
    assert late - warm < 40 * 2**20, (warm, late)


def test_a_request_holds_its_place_while_its_session_starts():
    """The worker takes a waiting request and then builds its session (a llama.cpp context takes a while): in
    between, the request must still count, or one more than --parallel + --max-waiting gets in (seen with the demo
    on llama.cpp, where the 429 test got a 200)."""
    import asyncio

    from triattn_local.backends import load_engine
    from triattn_local.engine import CompressionSettings
    from triattn_local.sampling import SamplingParams
    from triattn_local.serve.conversations import SnapshotStore
    from triattn_local.serve.scheduler import Job, Scheduler

    engine = load_engine("demo", backend="torch", device="cpu")
    starting, release = threading.Event(), threading.Event()
    session = engine.session

    def slow_session(*args, **kwargs):
        starting.set()
        release.wait(60)
        return session(*args, **kwargs)

    engine.session = slow_session
    loop = asyncio.new_event_loop()
    scheduler = Scheduler(engine, CompressionSettings(policy=None), SnapshotStore(0, 0), parallel=1, max_waiting=1)
    scheduler.start()
    try:
        jobs = [Job([5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0), False, loop) for _ in range(3)]
        for job in jobs[:2]:
            assert scheduler.admit(job)
            scheduler.submit(job)
        assert starting.wait(30)  # the first is being started: one running, one waiting
        assert not scheduler.admit(jobs[2])
        assert scheduler.counts() == (1, 1)
    finally:
        release.set()
        scheduler.stop()
        scheduler.thread.join(timeout=60)
        loop.close()
