"""One worker thread owns the model and serves every request: a fair round-robin over active requests.

Each active request is a Session.generate generator; one step advances it to its next sampled token (a long prompt
is one step, or one step per compression round when compression is on). So a new request's first token waits for
at most one step of each other request, not for them to finish. At most `parallel` requests are active (each holds
its KV cache); the others wait in arrival order. Sessions advance one at a time rather than in one batched forward:
the engine's batch runner needs equal lengths in lockstep, which requests of a server never have.

Events go back to each request's asyncio queue through its event loop. A request whose client went away is
cancelled: its generator is closed and its session dropped, which frees its KV cache.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, replace

from ..engine import DoneEvent, TokenEvent
from ..sampling import SamplingParams
from .conversations import ConversationStore, Turn

log = logging.getLogger("triattn.serve")


@dataclass
class Started:
    cached: int  # prompt tokens served from a kept conversation
    reused: bool


@dataclass
class Failed:
    message: str


class Job:
    """One request as the worker sees it. The handler reads job.queue; after DoneEvent, job.session is the
    handler's (to keep as a conversation or drop)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, turn: Turn | None, context_length: int,
                 loop: asyncio.AbstractEventLoop, reserve: int | None = None):
        self.prompt_ids = prompt_ids
        self.params = params
        # output room a reused conversation must leave (its positions run ahead of the prompt: it keeps earlier
        # reasoning); without it the prompt is prefilled afresh
        self.reserve = params.max_tokens if reserve is None else reserve
        self.turn = turn
        self.context_length = context_length
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.session = None
        self.base_ids: list[int] = []  # what the reused cache had consumed before this request
        self.feed: list[int] = []
        self.rounds_before = 0
        self.gen = None

    def post(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    def __init__(self, engine, settings, store: ConversationStore, parallel: int):
        self.engine = engine
        self.settings = settings
        self.store = store
        self.parallel = max(1, parallel)
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []
        self._lock = threading.Lock()  # guards the lists for readers on other threads (metrics)
        self.thread = threading.Thread(target=self._run, name="triattn-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def stop(self) -> None:
        self.inbox.put(None)

    def counts(self) -> tuple[int, int]:
        """(running, waiting)."""
        with self._lock:
            return len(self.active), len(self.waiting) + self.inbox.qsize()

    def sessions(self) -> list:
        with self._lock:
            return [job.session for job in self.active if job.session is not None]

    # -- the worker --
    def _run(self) -> None:
        while True:
            try:
                if not self._admit():
                    return
                for job in list(self.active):
                    self._advance(job)
            except Exception:  # a bug: keep serving the other requests rather than hang them all
                log.exception("scheduler step failed")

    def _admit(self) -> bool:
        """Move arrivals into the waiting line (blocking while nothing is active), then start waiting jobs while
        there is room. False when asked to stop."""
        block = not self.active and not self.waiting
        while True:
            try:
                job = self.inbox.get(block=block)
            except queue.Empty:
                break
            if job is None:
                return False
            block = False
            with self._lock:
                self.waiting.append(job)
        while True:
            with self._lock:
                if not self.waiting or len(self.active) >= self.parallel:
                    break
                job = self.waiting.popleft()
            if job.cancelled.is_set():
                continue
            try:
                self._start(job)
            except Exception as e:  # a bug, not bad input (inputs were validated): tell this client only
                log.exception("cannot start a request")
                job.session = None
                job.post(Failed(f"cannot start generation: {type(e).__name__}"))
                continue
            with self._lock:
                self.active.append(job)
        return True

    def _start(self, job: Job) -> None:
        params = job.params

        def fits(conversation, feed):
            return conversation.session.logical + len(feed) + job.reserve <= job.context_length

        match = self.store.take(job.prompt_ids, job.turn, fits)
        if match is not None:
            room = job.context_length - match.conversation.session.logical - len(match.feed)
            params = job.params = replace(params, max_tokens=min(params.max_tokens, room))
            job.session = match.conversation.session
            job.base_ids = match.conversation.ids
            job.feed = match.feed
            job.rounds_before = job.session.metrics().rounds
            job.post(Started(cached=match.cached, reused=True))
        else:
            job.session = self.engine.session(self.settings)
            job.feed = job.prompt_ids
            job.post(Started(cached=0, reused=False))
        job.gen = job.session.generate(job.feed, params, set_prompt=match is None)

    def _advance(self, job: Job) -> None:
        """Run one step of a job: up to its next sampled token, or its end."""
        if job.cancelled.is_set():
            self._drop(job, close=True)
            return
        try:
            for event in job.gen:
                job.post(event)
                if isinstance(event, TokenEvent):
                    return
                if isinstance(event, DoneEvent):
                    break
            self._remove(job)  # done: the session now belongs to the handler
        except Exception as e:
            log.exception("generation failed")
            job.post(Failed(f"generation failed: {type(e).__name__}"))
            self._drop(job, close=False)

    def _remove(self, job: Job) -> None:
        with self._lock:
            if job in self.active:
                self.active.remove(job)

    def _drop(self, job: Job, close: bool) -> None:
        if close and job.gen is not None:
            job.gen.close()
        job.gen = None
        job.session = None  # the only reference: its KV cache is freed
        self._remove(job)
