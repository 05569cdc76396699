"""Engine events → UI messages, in the generation thread, with text batched so the screen updates ~20x a second.

The engine yields one event per token; re-rendering Markdown that often flickers and wastes the UI thread. relay()
collects text for `interval` seconds and sends it as one Chunk; KV updates, the end of reasoning and the end of the
reply go out at once (after the text before them)."""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

from textual.message import Message

from ..compression import RoundRecord
from ..engine import CompressionEvent, DoneEvent, Event, KVEvent, KVMetrics, TextEvent, TokenEvent
from .thinking import ThinkSplitter


class Chunk(Message):
    """New reply text since the last chunk, split into reasoning and answer."""

    def __init__(self, raw: str, thinking: str, answer: str, tokens: int, tokens_per_second: float,
                 metrics: KVMetrics | None):
        super().__init__()
        self.raw = raw  # the text as generated (tags included), what the conversation stores
        self.thinking, self.answer = thinking, answer
        self.tokens, self.tokens_per_second = tokens, tokens_per_second
        self.metrics = metrics  # the cache's counters now, so the KV panel follows the stream


class FirstToken(Message):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds  # time to first token, from the moment the turn was sent


class ThinkingEnded(Message):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds


class KVUpdate(Message):
    """The cache's counters; with the round's kept positions when a compression round just ran."""

    def __init__(self, metrics: KVMetrics, record: RoundRecord | None = None):
        super().__init__()
        self.metrics, self.record = metrics, record


class Finished(Message):
    def __init__(self, done: DoneEvent):
        super().__init__()
        self.done = done


class Failed(Message):
    """The backend raised mid-stream: the reply so far stays, the error is shown, the app stays usable."""

    def __init__(self, error: str):
        super().__init__()
        self.error = error


def relay(events: Iterable[Event], metrics: Callable[[], KVMetrics] | None = None,
          clock: Callable[[], float] = time.monotonic, interval: float = 0.05,
          timer: Callable[[], float] = time.perf_counter, starts_thinking: bool = False) -> Iterator[Message]:
    """UI messages for one reply's engine events. metrics() reads the cache's counters between events (same
    thread). `clock` times what the user reads (time to first token, reasoning time; tests pass a fake one),
    `timer` only paces the batching and the live tok/s. starts_thinking: the prompt already opened <think>.
    If the events raise, the text received so far is sent before the error propagates."""
    start = clock()
    splitter = ThinkSplitter(thinking=starts_thinking)
    raw: list[str] = []
    thinking: list[str] = []
    answer: list[str] = []
    tokens = 0
    first_timer = None
    think_start = None
    thinking_open = False
    last_flush = timer()

    def chunk() -> Chunk | None:
        nonlocal last_flush
        last_flush = timer()
        if not raw and not thinking and not answer:
            return None
        elapsed = timer() - first_timer if first_timer is not None else 0.0
        rate = (tokens - 1) / elapsed if elapsed > 0 and tokens > 1 else 0.0
        out = Chunk("".join(raw), "".join(thinking), "".join(answer), tokens, rate, metrics() if metrics else None)
        raw.clear()
        thinking.clear()
        answer.clear()
        return out

    def pieces(parts: list[tuple[str, str]]) -> Iterator[Message]:
        nonlocal think_start, thinking_open
        for kind, text in parts:
            if kind == "think":
                if think_start is None:
                    think_start, thinking_open = clock(), True
                thinking.append(text)
            else:
                answer.append(text)
        if thinking_open and splitter.state == "answer":  # </think> just passed
            thinking_open = False
            pending = chunk()
            if pending:
                yield pending
            yield ThinkingEnded(clock() - think_start)

    try:
        for event in events:
            if isinstance(event, TokenEvent):
                tokens += 1
                if first_timer is None:
                    first_timer = timer()
                    yield FirstToken(clock() - start)
            elif isinstance(event, TextEvent):
                raw.append(event.text)
                yield from pieces(splitter.feed(event.text))
                if timer() - last_flush >= interval:
                    pending = chunk()
                    if pending:
                        yield pending
            elif isinstance(event, (KVEvent, CompressionEvent)):
                pending = chunk()
                if pending:
                    yield pending
                yield KVUpdate(event.metrics, event.record if isinstance(event, CompressionEvent) else None)
            elif isinstance(event, DoneEvent):
                yield from pieces(splitter.finish())
                pending = chunk()
                if pending:
                    yield pending
                yield Finished(event)
    except Exception:
        yield from pieces(splitter.finish())
        pending = chunk()
        if pending:
            yield pending
        raise
