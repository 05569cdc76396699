"""Server counters and gauges, rendered as Prometheus text (GET /metrics).

Counters grow over the server's life; KV gauges are summed over the sessions alive now (running requests and kept
cache snapshots), so retained vs logical tokens show what compression holds back at this moment."""

from __future__ import annotations

import threading
from collections import Counter


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (endpoint, status) → count
        self.totals: Counter = Counter()  # prompt_tokens, cached_tokens, completion_tokens, ...
        self.last_tokens_per_second = 0.0

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def finished(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int, reasoning_tokens: int,
                 decode_seconds: float, prefill_seconds: float, rounds: int, reused: bool) -> None:
        with self._lock:
            t = self.totals
            t["prompt_tokens"] += prompt_tokens
            t["cached_tokens"] += cached_tokens
            t["completion_tokens"] += completion_tokens
            t["reasoning_tokens"] += reasoning_tokens
            t["decode_seconds"] += decode_seconds
            t["prefill_seconds"] += prefill_seconds
            t["compression_rounds"] += rounds
            t["conversation_hits" if reused else "conversation_misses"] += 1
            if decode_seconds > 0:
                self.last_tokens_per_second = completion_tokens / decode_seconds

    def cancelled(self) -> None:
        with self._lock:
            self.totals["cancelled"] += 1

    def render(self, sessions: list, running: int, waiting: int, snapshots: int, rss_bytes: int) -> str:
        """Prometheus exposition text."""
        live = [s.metrics() for s in sessions]
        retained = sum(m.retained_tokens for m in live)
        logical = sum(m.logical_tokens for m in live)
        kv_bytes = sum(m.kv_bytes for m in live)
        kv_full = sum(m.kv_bytes_full for m in live)
        with self._lock:
            t = dict(self.totals)
            requests = dict(self.requests)
            tps = self.last_tokens_per_second
        lines: list[str] = []

        def one(value) -> list[tuple[str, float]]:
            return [("", value)]

        table = [
            ("requests_total", "counter", "HTTP requests by endpoint and status code.",
             [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(requests.items())] or one(0)),
            ("requests_running", "gauge", "Requests generating now.", one(running)),
            ("requests_waiting", "gauge", "Requests queued for a free slot.", one(waiting)),
            ("requests_cancelled_total", "counter", "Generations cancelled because the client went away.",
             one(t.get("cancelled", 0))),
            ("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", one(t.get("prompt_tokens", 0))),
            ("prompt_tokens_cached_total", "counter", "Prompt tokens served from a kept cache snapshot, not prefilled.",
             one(t.get("cached_tokens", 0))),
            ("generation_tokens_total", "counter", "Generated tokens.", one(t.get("completion_tokens", 0))),
            ("reasoning_tokens_total", "counter", "Tokens generated inside <think>.",
             one(t.get("reasoning_tokens", 0))),
            ("decode_seconds_total", "counter", "Time spent decoding.", one(float(t.get("decode_seconds", 0.0)))),
            ("prefill_seconds_total", "counter", "Time spent on prompts.", one(float(t.get("prefill_seconds", 0.0)))),
            ("decode_tokens_per_second", "gauge", "Decode speed of the last finished request.", one(float(tps))),
            ("compression_rounds_total", "counter", "TriAttention compression rounds.",
             one(t.get("compression_rounds", 0))),
            ("conversation_reuse_total", "counter", "Requests that started from a kept cache snapshot (hit) or not.",
             [('{result="hit"}', t.get("conversation_hits", 0)), ('{result="miss"}', t.get("conversation_misses", 0))]),
            ("cache_snapshots", "gauge", "Cache snapshots kept for prefix reuse (their K/V counts in kv_bytes).",
             one(snapshots)),
            ("kv_retained_tokens", "gauge", "KV tokens held by live sessions (per layer and KV head).", one(retained)),
            ("kv_logical_tokens", "gauge", "Tokens live sessions have seen (what full attention would hold).",
             one(logical)),
            ("kv_bytes", "gauge", "Bytes of K/V held by live sessions.", one(kv_bytes)),
            ("kv_bytes_saved", "gauge", "Bytes of K/V full attention would hold beyond what is held.",
             one(max(0, kv_full - kv_bytes))),
            ("process_resident_memory_bytes", "gauge", "Resident memory of the server process.", one(rss_bytes)),
        ]
        for name, kind, help, samples in table:
            lines.append(f"# HELP triattn_{name} {help}")
            lines.append(f"# TYPE triattn_{name} {kind}")
            for labels, value in samples:
                text = f"{value:g}" if isinstance(value, float) else str(value)
                lines.append(f"triattn_{name}{labels} {text}")
        return "\n".join(lines) + "\n"
