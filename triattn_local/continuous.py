"""Continuous batching: sequences that arrived at different times decode together, one batched step for all.

A sequence joins after its prefill (run a chunk at a time, so a long prompt never stalls the others for long) and
leaves when it ends; between steps the set changes freely. Each sequence keeps its own length, RoPE positions and
compression rounds: its Session does the bookkeeping and its rounds exactly as for a lone sequence, over a row of the
backend's RowBatch (Engine.new_row_batch); only the forward of the decode step is shared. So a sequence gives the
same tokens as Session.generate would alone (greedy), whoever else is in the batch. The step is pipelined: the
next forward is launched as soon as the tokens are drawn, and turning them into text (detokenisation, stop strings)
happens while it runs.
"""

from __future__ import annotations

import time
from typing import Iterator

from .engine import (PREFILL_CHUNK, CompressionSettings, DoneEvent, Engine, Event, KVEvent, Session, TokenStream,
                     keep_logits_on_device)
from .sampling import SamplingParams, draw_many


class BatchedSequence:
    """One sequence of a ContinuousBatch: its session over a batch row, its token stream, its timings."""

    def __init__(self, session: Session, runner, stream: TokenStream, prompt_len: int):
        self.session = session
        self.runner = runner  # the RowRunner the session runs on
        self.stream = stream
        self.prompt_len = prompt_len
        self.prefill: Iterator | None = None  # Session.prefill while the prompt runs
        self.decoding = False
        self.job = None  # the server's request it serves, if any
        self.t_prefill = 0.0
        self.t_decode = 0.0

    @property
    def done(self) -> bool:
        return self.stream.finish is not None


class ContinuousBatch:
    """The sequences of one engine and one compression setting that share a RowBatch."""

    def __init__(self, engine: Engine, settings: CompressionSettings, rows):
        self.engine = engine
        self.settings = settings
        self.rows = rows  # the backend's RowBatch
        keep_logits_on_device(self.rows)
        self.in_flight: tuple[list[BatchedSequence], object] | None = None  # a launched step: its sequences, logits

    @classmethod
    def create(cls, engine: Engine, settings: CompressionSettings, rows: int, kv_memory: int | None = None,
               reserve: int = 0) -> "ContinuousBatch | None":
        """A batch of at most `rows` sequences (fewer where kv_memory bytes, or the free GPU memory less `reserve`,
        hold fewer), or None where the engine cannot batch these settings."""
        batch = engine.new_row_batch(settings, rows, kv_memory, reserve)
        return None if batch is None else cls(engine, settings, batch)

    @property
    def capacity(self) -> int:
        """How many sequences can be in the batch at once (what the KV memory holds)."""
        return self.rows.rows

    def has_room(self) -> bool:
        return bool(self.rows.free)

    def start(self, prompt_ids: list[int], params: SamplingParams, *, restore=None, set_prompt: bool = True,
              cuts: tuple[int, ...] = ()) -> BatchedSequence | None:
        """A new sequence on a free row (None if there is none), its prefill ready to run; restore: a Snapshot
        (prefix reuse) to start from, prompt_ids then being what follows it."""
        runner = self.rows.acquire()
        if runner is None:
            return None
        try:
            session = self.engine.session(self.settings, runner)
            if restore is not None:
                session.restore(restore)
        except BaseException:
            self.rows.release(runner)
            raise
        seq = BatchedSequence(session, runner, TokenStream(self.engine, params), len(prompt_ids))
        seq.prefill = session.prefill(prompt_ids, set_prompt, cuts)
        return seq

    def prefill_step(self, seq: BatchedSequence) -> list[Event]:
        """Run the next chunk of a sequence's prompt. When the prompt is done, its first token is sampled and it
        joins the decoding sequences (or ends already)."""
        events: list[Event] = []
        t0 = time.perf_counter()
        for item in seq.prefill:
            if item is PREFILL_CHUNK:
                seq.t_prefill += time.perf_counter() - t0
                return events
            if isinstance(item, Event):
                events.append(item)
                continue
            seq.prefill = None  # the last logits
            seq.t_prefill += time.perf_counter() - t0
            events.append(KVEvent(seq.session.metrics()))
            if not seq.done:  # max_tokens 0 ends before the first token
                t1 = time.perf_counter()
                events += seq.stream.take(item)
                seq.t_decode += time.perf_counter() - t1
            seq.decoding = not seq.done
            return events
        raise RuntimeError("prefill ended without logits")

    def decode_step(self, seqs: list[BatchedSequence]) -> dict[BatchedSequence, list[Event]]:
        """One token for each decoding sequence from one batched forward, then each one's rounds and sampling.

        Pipelined: once the tokens are drawn (one transfer), the next step's forward is launched for every sequence
        that goes on (EOS and max_tokens are known from the ids), and only then do the tokens become text, so
        detokenisation and stop strings run on the host while the GPU computes. A sequence that a stop string
        ends has one step in flight for nothing; its row is free as soon as it is finished (the device runs the
        row's work in order). Returns the events of the tokens drawn in this call."""
        ready = [s for s in seqs if s.decoding and not s.done]
        if self.in_flight is None:
            if not ready:
                return {}
            self._launch(ready, [s.stream.tokens[-1] for s in ready])
        t0 = time.perf_counter()
        flight, logits = self.in_flight
        self.in_flight = None
        live = [(i, s) for i, s in enumerate(flight) if s.decoding and not s.done]  # not cancelled meanwhile
        rounds = [(s, s.session.appended_later(1)) for _, s in live]  # their device work queued behind the step
        ids = draw_many([s.stream.sampler for _, s in live], logits, [i for i, _ in live])  # one transfer
        going = [(s, t) for (_, s), t in zip(live, ids)
                 if t not in s.stream.eos and len(s.stream.tokens) + 1 < s.stream.params.max_tokens]
        flying = {s for _, s in live}
        joined = [(s, s.stream.tokens[-1]) for s in ready if s not in flying]  # their prefill just ended
        if going or joined:
            self._launch([s for s, _ in going + joined], [t for _, t in going + joined])
        out: dict[BatchedSequence, list[Event]] = {s: finish() for s, finish in rounds}  # recorded, the step launched
        for (_, seq), token in zip(live, ids):
            out[seq] += seq.stream.accept(token)
            seq.decoding = not seq.done
        spent = time.perf_counter() - t0
        for seq in out:
            seq.t_decode += spent
        return out

    def _launch(self, seqs: list[BatchedSequence], tokens: list[int]) -> None:
        logits = self.rows.decode([s.runner for s in seqs], tokens, [s.session.logical for s in seqs])
        self.in_flight = (seqs, logits)

    def finish(self, seq: BatchedSequence, reason: str | None = None) -> list[Event]:
        """End a sequence (done, or cancelled with reason="cancelled"): its row is freed; the closing events."""
        if reason is not None and not seq.done:
            seq.stream.finish = reason
        seq.decoding = False
        if seq.prefill is not None:
            seq.prefill.close()
            seq.prefill = None
        self.rows.release(seq.runner)
        events = seq.stream.flush()
        events.append(DoneEvent(seq.stream.finish or "cancelled", seq.prompt_len, len(seq.stream.tokens),
                                seq.t_prefill, seq.t_decode, seq.session.metrics()))
        return events
