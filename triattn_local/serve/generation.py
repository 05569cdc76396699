"""A job's events → what a handler sends: text deltas (parsed into reasoning, content and tool calls for chat, cut
at stop strings), then a Summary; at the end the metrics are recorded."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import DoneEvent, KVMetrics, TextEvent, TokenEvent
from .chat_format import OutputParser
from .errors import APIError
from .scheduler import Failed, Job, Started


@dataclass
class Summary:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    kv: KVMetrics


class Run:
    """Drives one job for a handler: submits it, turns its events into text deltas (parsed for chat), and at the end
    records metrics. Closing the iteration early cancels the job."""

    def __init__(self, state, job: Job, parser: OutputParser | None):
        self.state, self.job, self.parser = state, job, parser

    def _text(self, text: str):
        """Text through the chat parser: a Delta (chat), a str (completions) or None. (The engine never streams any
        part of a stop string.)"""
        if not text:
            return None
        return (self.parser.feed(text) if self.parser else text) or None

    async def events(self):
        """Yields Delta (chat) or str (completions) items, then one Summary."""
        state, job, parser = self.state, self.job, self.parser
        state.scheduler.submit(job)
        generated: list[int] = []
        reasoning_tokens, started, finished = 0, Started(0, False), False
        try:
            while True:
                item = await job.queue.get()
                if isinstance(item, Started):
                    started = item
                elif isinstance(item, TokenEvent):
                    generated.append(item.token_id)
                    reasoning_tokens += bool(parser and parser.in_reasoning)
                elif isinstance(item, TextEvent):
                    out = self._text(item.text)
                    if out:
                        yield out
                elif isinstance(item, Failed):
                    finished = True
                    raise APIError(500, item.message, type="server_error")
                elif isinstance(item, DoneEvent):
                    finished = True
                    out = parser.finish() if parser else None
                    if out:
                        yield out
                    yield self._finish(item, generated, reasoning_tokens, started)
                    return
        finally:
            if not finished:
                job.cancel()
                state.metrics.cancelled()

    def _finish(self, done: DoneEvent, generated: list[int], reasoning_tokens: int, started: Started) -> Summary:
        state, job, parser = self.state, self.job, self.parser
        finish = done.finish_reason
        if parser and parser.tool_calls and finish == "stop":
            finish = "tool_calls"
        rounds = done.metrics.rounds - job.rounds_before
        state.metrics.finished(len(job.prompt_ids), started.cached, done.generated_tokens, reasoning_tokens,
                               done.decode_seconds, done.prefill_seconds, rounds, started.reused)
        return Summary(finish, len(job.prompt_ids), done.generated_tokens, started.cached, reasoning_tokens,
                       done.metrics)
