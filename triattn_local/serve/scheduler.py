"""One worker thread owns the model and serves every request: a fair round-robin over active requests.

Each active request is a Session.generate generator; one step advances it to its next sampled token (a long prompt
is one step, or one step per compression round when compression is on). So a new request's first token waits for
at most one step of each other request, not for them to finish. At most `parallel` requests are active (each holds
its KV cache); the others wait in arrival order. Where the backend has a row batch (the torch static path on
CUDA), BatchedScheduler instead decodes every active request in one batched step (continuous.py); elsewhere
sessions advance one at a time.

Events go back to each request's asyncio queue through its event loop. A request whose client went away is
cancelled: its generator is closed and its session dropped, which frees its KV cache.

A request starts from the longest kept cache snapshot its prompt begins with (conversations.py), and its prefill
stops at the prompt's cut points, where the worker snapshots the cache for later requests.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import weakref
from collections import deque
from dataclasses import dataclass

from ..engine import BoundaryEvent, DoneEvent, TokenEvent
from ..sampling import SamplingParams
from .conversations import SnapshotStore, cut_points, snapshot_points

log = logging.getLogger("triattn.serve")


@dataclass
class Started:
    cached: int  # prompt tokens served from a kept snapshot
    reused: bool


@dataclass
class Failed:
    message: str


class Job:
    """One request as the worker sees it. The handler reads job.queue; the worker drops the session when it ends.
    chat: snapshot at the prompt's message boundaries (else at its last cut)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, chat: bool, loop: asyncio.AbstractEventLoop):
        self.prompt_ids = prompt_ids
        self.params = params
        self.chat = chat
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.session = None
        self.snapshot_at: set[int] = set()  # prompt positions to snapshot at
        self.rounds_before = 0  # rounds the restored snapshot had run
        self.gen = None
        self.seq = None  # its BatchedSequence, under continuous batching

    def post(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    def __init__(self, engine, settings, store: SnapshotStore, parallel: int, max_waiting: int | None = None):
        self.engine = engine
        self.settings = settings
        self.store = store
        self.parallel = max(1, parallel)
        self.max_waiting = max_waiting  # None: no bound on the wait line
        self._admitted: weakref.WeakSet[Job] = weakref.WeakSet()  # admitted, not submitted yet (gone if dropped)
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []
        self._lock = threading.Lock()  # guards the lists for readers on other threads (metrics)
        self.thread = threading.Thread(target=self._run, name="triattn-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def admit(self, job: Job) -> bool:
        """Reserve a place for a job before its response starts: False when `parallel` requests generate and
        `max_waiting` wait already (the handler answers 429). A job never submitted frees its place when dropped."""
        with self._lock:
            if self.max_waiting is not None:
                pending = len(self.active) + len(self.waiting) + self.inbox.qsize() + len(self._admitted)
                if pending >= self.parallel + self.max_waiting:
                    return False
            self._admitted.add(job)
            return True

    def submit(self, job: Job) -> None:
        self.inbox.put(job)
        with self._lock:
            self._admitted.discard(job)

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
                self._turn()
            except Exception:  # a bug: keep serving the other requests rather than hang them all
                log.exception("scheduler step failed")

    def _turn(self) -> None:
        """One round of the worker: each active request advances by one step."""
        for job in list(self.active):
            self._advance(job)

    def _prefix(self, job: Job):
        """The prompt's cut points and the kept snapshot it starts from (None), with its snapshot points set."""
        cuts: list[int] = []
        match = None
        if self.store.enabled:
            turn_ends = self.engine.eos_token_ids()
            cuts = cut_points(job.prompt_ids, turn_ends)
            job.snapshot_at = set(snapshot_points(job.prompt_ids, turn_ends, job.chat))
            match = self.store.match(job.prompt_ids)
        return cuts, match

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
                self.active.append(job)  # counted while it starts (a llama.cpp context takes a while): never free
            try:
                self._start(job)
            except Exception as e:  # a bug, not bad input (inputs were validated): tell this client only
                log.exception("cannot start a request")
                self._remove(job)
                job.session = None
                job.post(Failed(f"cannot start generation: {type(e).__name__}"))
        return True

    def _start(self, job: Job) -> None:
        prompt = job.prompt_ids
        job.session = self.engine.session(self.settings)
        cuts, match = self._prefix(job)
        cached = 0
        if match is not None:
            job.session.restore(match.snapshot)
            if job.session.state is not None:
                job.session.state.prompt_len = len(prompt)  # as the same request sent cold sets it
            job.rounds_before = match.snapshot.kv.rounds
            cached = match.cached
        job.post(Started(cached=cached, reused=match is not None))
        job.gen = job.session.generate(prompt[cached:], job.params, set_prompt=match is None,
                                       cuts=tuple(c for c in cuts if c > cached))

    def _snapshot(self, job: Job, position: int) -> None:
        """Keep the cache at this cut of the prompt, unless kept already or not worth one."""
        if position not in job.snapshot_at or self.store.has(job.prompt_ids[:position]):
            return
        snapshot = job.session.snapshot()
        if snapshot is not None:
            self.store.put(job.prompt_ids[:position], snapshot, snapshot.kv.kv_bytes)

    def _advance(self, job: Job) -> None:
        """Run one step of a job: up to its next sampled token, or its end."""
        if job.cancelled.is_set():
            self._drop(job, close=True)
            return
        try:
            for event in job.gen:
                if isinstance(event, BoundaryEvent):
                    self._snapshot(job, event.position)
                    continue
                if isinstance(event, DoneEvent):
                    break
                job.post(event)
                if isinstance(event, TokenEvent):
                    return
            else:
                event = None
            # done: its cache lives on only in the snapshots taken. Dropped before the client hears the end, so
            # that what it asks next (/metrics, a new request) sees the place free.
            self._drop(job, close=False)
            if event is not None:
                job.post(event)
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


class BatchedScheduler(Scheduler):
    """Continuous batching, where the engine can (the torch static path on CUDA): every decoding request advances
    by one token in one batched step (continuous.py). Each turn of the worker runs one prefill chunk of the oldest
    request still reading its prompt, then the batched step, so a new request's prompt never stalls the others for
    more than a chunk, and its first token comes as soon as its prompt is read. At most as many requests run as the
    batch has rows (what the KV memory holds); the rest wait in arrival order."""

    def __init__(self, engine, settings, store: SnapshotStore, batch, parallel: int, max_waiting: int | None = None):
        super().__init__(engine, settings, store, min(parallel, batch.capacity), max_waiting)
        self.batch = batch

    def _start(self, job: Job) -> None:
        prompt = job.prompt_ids
        cuts, match = self._prefix(job)
        cached = 0 if match is None else match.cached
        seq = self.batch.start(prompt[cached:], job.params, restore=None if match is None else match.snapshot,
                               set_prompt=match is None, cuts=tuple(c for c in cuts if c > cached))
        if seq is None:
            raise RuntimeError("no free batch row")  # parallel never exceeds the rows
        seq.job = job
        job.seq, job.session = seq, seq.session
        if match is not None:
            if seq.session.state is not None:
                seq.session.state.prompt_len = len(prompt)  # as the same request sent cold sets it
            job.rounds_before = match.snapshot.kv.rounds
        job.post(Started(cached=cached, reused=match is not None))

    def _turn(self) -> None:
        for job in list(self.active):
            if job.cancelled.is_set():
                self._end(job, "cancelled", post=False)
        reading = [job for job in self.active if job.seq.prefill is not None]
        if reading:
            job = reading[0]
            try:
                self._deliver(job, self.batch.prefill_step(job.seq))
            except Exception as e:
                log.exception("prefill failed")
                self._fail(job, e)
        decoding = [job.seq for job in self.active if job.seq.decoding]
        if not decoding:
            return
        try:
            stepped = self.batch.decode_step(decoding)
        except Exception as e:
            log.exception("batched decode step failed")
            for seq in decoding:
                self._fail(seq.job, e)
            return
        for seq, events in stepped.items():
            self._deliver(seq.job, events)

    def _deliver(self, job: Job, events: list) -> None:
        for event in events:
            if isinstance(event, BoundaryEvent):
                self._snapshot(job, event.position)
            else:
                job.post(event)
        if job.seq.done:
            self._end(job, None, post=True)

    def _end(self, job: Job, reason: str | None, post: bool) -> None:
        events = self.batch.finish(job.seq, reason)  # frees the row
        job.session = None
        self._remove(job)  # before the client hears the end, as in _advance
        if post:
            for event in events:
                job.post(event)

    def _fail(self, job: Job, error: Exception) -> None:
        job.post(Failed(f"generation failed: {type(error).__name__}"))
        if job in self.active:
            self._end(job, "cancelled", post=False)
