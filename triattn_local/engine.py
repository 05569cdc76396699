"""The engine interface every backend implements, and the one generation loop they share.

load (backends.load_engine) → Engine → Engine.session(...) → Session.generate(...) yields events. A backend only
provides a ModelRunner: for a batch of sequences in lockstep, run tokens at given positions into their caches and
return logits, score their cached keys with the round's virtual queries, compact their caches, and drop finished
sequences. Chunked prefill, when to compress, sampling, stop conditions, streaming text and cancellation live here
once, so the CLI, the server and the TUI see one behaviour; Session runs one sequence (a batch of one, through
SequenceRunner), batch.generate_batch many prompts of one length at once.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np

from .compression import CompressionState, RoundRecord
from .methods import DEFAULT_METHOD, DEFAULT_OBS_WINDOW, KeyScorer, check_method, make_scorer
from .policy import AUTO, PREFILL_TOKENS, PRUNING_MODES, BudgetPolicy
from .rope import ModelShape
from .sampling import Sampler, SamplingParams
from .scorer import DEFAULT_MAX_OFFSET
from .stats.format import QueryStats


# ---- events ---------------------------------------------------------------------------------------------------


@dataclass
class TokenEvent:
    token_id: int


@dataclass
class TextEvent:
    text: str


@dataclass
class KVMetrics:
    logical_tokens: int  # tokens the model has seen (prompt + generated)
    retained_tokens: int  # tokens whose K/V are still cached, per (layer, KV head)
    peak_retained_tokens: int
    budget: int | None  # None without compression
    kv_bytes: int  # bytes of K/V held now
    kv_bytes_full: int  # bytes full attention would hold now
    rounds: int


@dataclass
class KVEvent:
    metrics: KVMetrics


@dataclass
class CompressionEvent:
    record: RoundRecord
    metrics: KVMetrics


@dataclass
class BoundaryEvent:
    """The prompt has been run up to `position` (a cut asked for in generate): the session may be snapshotted now."""

    position: int


@dataclass
class DoneEvent:
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    metrics: KVMetrics

    @property
    def decode_tokens_per_second(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


Event = TokenEvent | TextEvent | KVEvent | CompressionEvent | BoundaryEvent | DoneEvent

PREFILL_CHUNK = object()  # Session.prefill's marker between prompt chunks (not an event for consumers)


# ---- what a backend provides ----------------------------------------------------------------------------------


class ModelRunner(Protocol):
    """A batch of B sequences' model + caches inside a backend. Row b of every argument and result is sequence b.

    The rows advance in lockstep: every forward appends the same number of tokens to every row at the same
    positions, and every row of every (layer, KV head) holds the same number T of cache slots (compaction keeps the
    same count K everywhere), so rounds happen at the same steps. Which slots are kept differs per row and head.
    B is set by the first forward after reset() and only shrinks, through select_rows.
    """

    def forward(self, token_ids: np.ndarray | list[list[int]], start_position: int) -> np.ndarray:
        """Append tokens [B, n] at positions start_position … start_position + n - 1 to every row's cache; return
        float logits [B, vocab] of each row's last token: a numpy array, or a torch tensor left on the GPU or an MLX
        array (the Sampler draws there, so only token ids cross to the host)."""

    def head_scores(self, scorer: KeyScorer, round_start: int) -> np.ndarray:
        """Scores [B, layers, heads, T] of every cached key for every query head (the backend's fast path)."""

    def compact(self, keep: np.ndarray) -> None:
        """Keep cache slots keep[row, layer, kv_head, :] ([B, layers, kv_heads, K], ascending); drop the rest."""

    def select_rows(self, rows: list[int]) -> None:
        """Keep only these rows (ascending indices into the current batch), in that order; drop the others."""

    def reset(self) -> None:
        """Empty the caches; the next forward sets the batch size."""

    # Optional: device_logits, a bool attribute; when a loop that samples with Sampler sets it (keep_logits_on_device),
    # forward may return a torch tensor on the GPU or an MLX array instead of a numpy array.
    # Optional (prefix reuse in the server): save() → a copy of a batch of one's cache, or None where this runner
    # cannot copy it; load(saved) → make this runner's cache a copy of a saved one (the saved copy stays intact).
    # Optional (a round planned on the device): compress_start(states, scorer) → a pending round whose finish()
    # returns each row's RoundRecord; the cache is compacted (or queued to be) when it returns.


def keep_logits_on_device(runner) -> None:
    """Let a runner that can (torch on CUDA, MLX) leave its logits on the GPU, for a loop that samples them with Sampler
    there: only the token ids cross to the host, not [B, vocab] floats, and no host sampler runs."""
    inner = getattr(runner, "runner", runner)  # a SequenceRunner's ModelRunner
    if hasattr(inner, "device_logits"):
        inner.device_logits = True


class SequenceRunner:
    """One sequence on a ModelRunner: a batch of one, called without the batch dimension (what Session uses).

    forward(token_ids [n], start) → logits [vocab]; head_scores → [layers, heads, T]; compact(keep [layers,
    kv_heads, K])."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def forward(self, token_ids: list[int], start_position: int) -> np.ndarray:
        return self.runner.forward([list(token_ids)], start_position)[0]

    def head_scores(self, scorer: KeyScorer, round_start: int) -> np.ndarray:
        return self.runner.head_scores(scorer, round_start)[0]

    def compact(self, keep: np.ndarray) -> None:
        self.runner.compact(keep[None])

    def compress_start(self, state: CompressionState, scorer: KeyScorer):
        """A whole round planned by the runner on its device where it can (the static runner: scores, selection
        and compaction on the GPU, only the kept indices to the host): its pending round, whose finish() gives the
        [RoundRecord]; None where the host plans it."""
        start = getattr(self.runner, "compress_start", None)
        return None if start is None else start([state], scorer)

    def reset(self) -> None:
        self.runner.reset()

    def save(self):
        save = getattr(self.runner, "save", None)
        return save() if save is not None else None

    def load(self, saved) -> None:
        self.runner.load(saved)


@dataclass
class CompressionSettings:
    """Compression on (a method and the policy; stats for TriAttention only) or off (full attention)."""

    policy: BudgetPolicy | None = field(default_factory=BudgetPolicy)
    stats: QueryStats | None = None
    offset_aggregation: str = "mean"
    group_aggregation: str = "max"
    method: str = DEFAULT_METHOD  # methods.METHODS: triattention or a baseline to compare it with
    obs_window: int = DEFAULT_OBS_WINDOW  # queries the attention-based baselines observe (capped by the window)
    max_offset: int = DEFAULT_MAX_OFFSET  # TriAttention scores keys for queries 1, 2, 4 … max_offset tokens ahead

    def __post_init__(self):
        check_method(self.method)

    @property
    def enabled(self) -> bool:
        return self.policy is not None


def resolve_pruning_mode(engine: "Engine", compression: CompressionSettings) -> CompressionSettings:
    """--pruning-mode auto made concrete: the engine's default mode."""
    if compression.enabled and compression.policy.pruning_mode == AUTO:
        policy = dataclasses.replace(compression.policy, pruning_mode=engine.default_pruning_mode())
        return dataclasses.replace(compression, policy=policy)
    return compression


class Engine(ABC):
    """A loaded model in one backend."""

    backend: str
    model_id: str  # what the user called the model: an alias (`demo`) or its path
    model_path: object  # the model directory (pathlib.Path)
    shape: ModelShape
    tokenizer: object  # Hugging Face-style: encode, decode, apply_chat_template, eos_token_id
    kv_bytes_per_token: int  # K+V bytes of one token over all layers and KV heads
    context_length: int  # logical context the model supports
    pruning_modes: tuple[str, ...] = PRUNING_MODES  # what this backend's cache can do

    def default_pruning_mode(self) -> str:
        """What --pruning-mode auto means here: per_head where the backend can, else its one mode."""
        return "per_head" if "per_head" in self.pruning_modes else self.pruning_modes[0]

    @abstractmethod
    def new_runner(self, scorer: KeyScorer | None = None, capacity: int | None = None) -> ModelRunner:
        """A runner for a batch of sequences, recording from the start what scorer needs (e.g. recent queries);
        capacity: the most slots each row's cache will hold (B + N with compression), for backends that
        preallocate."""

    def new_sequence_runner(self, scorer: KeyScorer | None = None, capacity: int | None = None) -> SequenceRunner:
        """A runner for one sequence (a backend may return a subclass that also exposes its cache for inspection).
        capacity: the most slots the cache will ever hold (B + N with compression), for backends that preallocate."""
        return SequenceRunner(self.new_runner(scorer, capacity))

    def session(self, compression: CompressionSettings | None = None, runner=None) -> "Session":
        """runner: a ModelRunner for this session's one sequence (a row of a RowBatch); else a new one."""
        return Session(self, compression or CompressionSettings(policy=None), runner)

    def new_row_batch(self, compression: CompressionSettings, rows: int, kv_memory: int | None = None,
                      reserve: int = 0):
        """Continuous batching (the server): a cache of at most `rows` sequences (as many as kv_memory bytes hold;
        by default what the accelerator has free, less `reserve` bytes kept for other uses such as snapshots) that
        decode together, each at its own length, with a runner per row for its prefill and rounds; None where
        this backend cannot (the default)."""
        return None

    def eos_token_ids(self) -> set[int]:
        ids = getattr(self.tokenizer, "eos_token_id", None)
        out = set(ids if isinstance(ids, (list, tuple, set)) else [ids] if ids is not None else [])
        for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            tid = self.tokenizer.convert_tokens_to_ids(name) if hasattr(self.tokenizer, "convert_tokens_to_ids") else None
            if isinstance(tid, int) and tid != getattr(self.tokenizer, "unk_token_id", None) and tid >= 0:
                out.add(tid)
        return out

    def encode_prompt(self, prompt: str, raw: bool = False, system: str | None = None) -> list[int]:
        """Token ids of a user prompt: through the chat template when the tokenizer has one (unless raw)."""
        tok = self.tokenizer
        if not raw and getattr(tok, "chat_template", None):
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return list(tok.encode(prompt))


# ---- the shared generation loop -------------------------------------------------------------------------------


class StreamingDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences.

    Only the tokens since the last emitted text are decoded (plus a few before them, for tokenizers whose
    decoding depends on the previous token), so streaming costs O(1) per token, not O(length)."""

    CONTEXT = 4

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already emitted
        self.read = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=False)
        text = decode(self.ids[self.prefix:], skip_special_tokens=False)
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""
        self.prefix = max(0, len(self.ids) - self.CONTEXT)
        self.read = len(self.ids)
        return text[len(before):]


class Session:
    """One conversation's cache in one engine. generate() continues from whatever the cache already holds."""

    def __init__(self, engine: Engine, compression: CompressionSettings, runner: ModelRunner | None = None):
        compression = resolve_pruning_mode(engine, compression)
        self.engine = engine
        self.compression = compression
        self._cancel = threading.Event()
        self.state: CompressionState | None = None
        self.scorer: KeyScorer | None = make_scorer(compression, engine.shape) if compression.enabled else None
        capacity = compression.policy.capacity if compression.enabled else None
        self.runner = SequenceRunner(runner) if runner is not None else \
            engine.new_sequence_runner(self.scorer, capacity=capacity)
        self.reset()

    def reset(self) -> None:
        self.runner.reset()
        self.logical = 0
        self.peak = 0
        if self.scorer is not None:
            shape = self.engine.shape
            self.state = CompressionState(self.compression.policy, self.scorer, shape.num_layers, shape.num_kv_heads,
                                          self.compression.group_aggregation)

    def cancel(self) -> None:
        """Ask a running generate() to stop after the current step (thread-safe)."""
        self._cancel.set()

    # -- snapshots (prefix reuse) --
    def snapshot(self) -> "Snapshot | None":
        """A copy of the cache and its bookkeeping as they are now, or None where the runner cannot copy its cache
        (attention-recording baselines) or the policy looks at the whole prompt (--protect-prefill: a round before
        this point depended on the length of the prompt that made it)."""
        if self.state is not None and self.compression.policy.protect_prefill:
            return None
        saved = self.runner.save()
        if saved is None:
            return None
        return Snapshot(saved, None if self.state is None else self.state.copy(), self.logical, self.peak,
                        self.metrics())

    def restore(self, snapshot: "Snapshot") -> None:
        """Make this session's cache a copy of a snapshot (taken from a session with the same engine and settings);
        the snapshot stays intact for other sessions."""
        self.runner.load(snapshot.runner_state)
        self.state = None if snapshot.state is None else snapshot.state.copy()
        self.logical, self.peak = snapshot.logical, snapshot.peak

    # -- metrics --
    def metrics(self) -> KVMetrics:
        return kv_metrics(self.engine, self.compression, self.state, self.logical, self.peak)

    # -- the loop --
    def _feed(self, token_ids: list[int], cuts: tuple[int, ...] = ()) -> Iterator[Event | np.ndarray]:
        """Run tokens through the model, in chunks and with compression rounds as the policy says; yields events,
        then the logits of the last token. cuts: logical positions where a chunk must end; a BoundaryEvent follows
        each (after the round that position triggers, if any)."""
        logits = None
        i = 0
        end = self.logical + len(token_ids)
        pending = sorted(c for c in set(cuts) if self.logical < c < end)
        while i < len(token_ids):
            if self.state is not None:
                n = self.compression.policy.prefill_chunk(self.state.retained)
            else:
                n = PREFILL_TOKENS  # bounds activation memory of a long prompt
            if pending:
                n = min(n, pending[0] - self.logical)
            chunk = token_ids[i:i + n]
            logits = self.runner.forward(chunk, self.logical)
            i += len(chunk)
            yield from self.appended(len(chunk))
            if pending and self.logical == pending[0]:
                pending.pop(0)
                yield BoundaryEvent(self.logical)
            if i < len(token_ids):
                yield PREFILL_CHUNK
        yield logits

    def appended(self, n: int) -> list[CompressionEvent]:
        """Bookkeeping after the runner appended n tokens to this session's cache (here, or in a batched decode
        step of the server): positions, the peak, and a compression round when the policy asks for one."""
        return self.appended_later(n)()

    def appended_later(self, n: int) -> Callable[[], list[CompressionEvent]]:
        """appended, with a round's device work queued now and its bookkeeping in the function returned. The batched
        server calls that after launching its next step, so the host neither waits for the round's device work nor
        for the step ahead of it: the round costs the device's time alone."""
        self.logical += n
        self.peak = max(self.peak, self.logical)
        if self.state is None:
            return list
        self.state.appended(n)
        if not self.state.needs_compression():
            return list
        start = getattr(self.runner, "compress_start", None)  # a runner written to the older protocol has none
        pending = None if start is None else start(self.state, self.scorer)
        if pending is None:
            event = self._compress_on_host()
            return lambda: [event]
        return lambda: [CompressionEvent(pending.finish()[0], self.metrics())]

    def prefill(self, prompt_ids: list[int], set_prompt: bool = True,
                cuts: tuple[int, ...] = ()) -> Iterator[Event | object]:
        """Run the prompt (after what the cache holds) a chunk at a time: yields events, PREFILL_CHUNK between
        chunks (where a server may run other work), then the last token's logits."""
        self._cancel.clear()
        if self.state is not None and set_prompt and self.logical == 0:
            self.state.prompt_len = len(prompt_ids)
        keep_logits_on_device(self.runner)
        yield from self._feed(list(prompt_ids), cuts)

    def _compress_on_host(self) -> CompressionEvent:
        """A round planned on the host: the runner's scores, the policy's choice, the runner's compaction."""
        scores = self.runner.head_scores(self.scorer, self.state.round_start)
        keep, record = self.state.plan(scores)
        self.runner.compact(keep)
        return CompressionEvent(record, self.metrics())

    def generate(self, prompt_ids: list[int], params: SamplingParams, set_prompt: bool = True,
                 cuts: tuple[int, ...] = ()) -> Iterator[Event]:
        """Prefill prompt_ids (after what the cache holds), then sample until EOS, a stop string or max_tokens.
        cuts: logical positions inside the prompt where prefill stops for a BoundaryEvent (a snapshot point).
        Prefill cut at the same positions computes the same cache whether or not it was interrupted there, so a
        session restored from a snapshot at a cut continues exactly as the uninterrupted one does."""
        t0 = time.perf_counter()
        logits = None
        for item in self.prefill(prompt_ids, set_prompt, cuts):
            if item is PREFILL_CHUNK:
                continue
            if not isinstance(item, Event):  # the last logits (numpy, or a torch tensor on the GPU), or None
                logits = item
            else:
                yield item
        t_prefill = time.perf_counter() - t0
        yield KVEvent(self.metrics())
        stream = TokenStream(self.engine, params)
        t1 = time.perf_counter()
        while not stream.finish:
            if self._cancel.is_set():
                stream.finish = "cancelled"
                break
            yield from stream.take(logits)
            if stream.finish:
                break
            for item in self._feed([stream.tokens[-1]]):
                if not isinstance(item, Event):
                    logits = item
                else:
                    yield item
        yield from stream.flush()
        yield DoneEvent(stream.finish, len(prompt_ids), len(stream.tokens), t_prefill, time.perf_counter() - t1,
                        self.metrics())


class TokenStream:
    """One completion's sampled tokens → events: the sampler, EOS, stop strings (never shown, and a stop string's
    beginning held back until it cannot be one), max_tokens. The same for Session.generate and for a server that
    decodes many sequences in one batched step. finish: None while going, then "stop" | "length" (| "cancelled",
    set by the caller)."""

    def __init__(self, engine: Engine, params: SamplingParams):
        self.params = params
        self.sampler = Sampler(params)
        self.eos = engine.eos_token_ids()
        self.detok = StreamingDetokenizer(engine.tokenizer)
        self.text, self.emitted = "", 0  # text[:emitted] has been yielded
        self.tokens: list[int] = []
        self.finish: str | None = None if params.max_tokens > 0 else "length"

    def take(self, logits) -> list[Event]:
        """Sample the next token from logits [vocab]; the events it makes (a TokenEvent, maybe text)."""
        return self.accept(self.sampler(logits))

    def accept(self, token: int) -> list[Event]:
        """The events of the next token (sampled by the caller with self.sampler)."""
        self.tokens.append(token)
        events: list[Event] = [TokenEvent(token)]
        if token in self.eos:
            self.finish = "stop"
            return events
        delta = self.detok.add(token)
        if delta:
            self.text += delta
            stops = self.params.stop
            hit = _find_stop(self.text, stops, len(delta))
            if hit is not None:
                if hit > self.emitted:
                    events.append(TextEvent(self.text[self.emitted:hit]))
                self.emitted = len(self.text)  # the stop string itself is never shown
                self.finish = "stop"
                return events
            ready = len(self.text) - partial_suffix_length(self.text, stops)  # hold back a stop string's beginning
            if ready > self.emitted:
                events.append(TextEvent(self.text[self.emitted:ready]))
                self.emitted = ready
        if len(self.tokens) >= self.params.max_tokens:
            self.finish = "length"
        return events

    def flush(self) -> list[Event]:
        """At the end (EOS, length or cancel): text held back was not a stop string after all."""
        if len(self.text) > self.emitted:
            text, self.emitted = self.text[self.emitted:], len(self.text)
            return [TextEvent(text)]
        return []


@dataclass
class Snapshot:
    """A session's cache at one point of its prompt (Session.snapshot): what the server keeps for prefix reuse.
    Its memory is the retained K/V: at most B + N slots per layer and KV head with compression."""

    runner_state: object  # the runner's own copy of its cache
    state: CompressionState | None  # slot positions, rounds (None without compression)
    logical: int
    peak: int
    kv: KVMetrics

    def metrics(self) -> KVMetrics:
        return self.kv


def kv_metrics(engine: Engine, compression: CompressionSettings, state: CompressionState | None, logical: int,
               peak: int) -> KVMetrics:
    """One sequence's KV metrics: from its CompressionState, or (full attention) from its logical length and peak."""
    retained = state.retained if state else logical
    per_token = engine.kv_bytes_per_token
    return KVMetrics(
        logical_tokens=logical,
        retained_tokens=retained,
        peak_retained_tokens=state.peak_retained if state else peak,
        budget=compression.policy.budget if compression.enabled else None,
        kv_bytes=retained * per_token,
        kv_bytes_full=logical * per_token,
        rounds=state.rounds if state else 0,
    )


def partial_suffix_length(text: str, stops: list[str]) -> int:
    """Length of the longest end of text that is a proper beginning of one of the strings (so it may still become
    one): held back by the generation loop for stop strings, and by the server's parser for tags."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _find_stop(text: str, stops: list[str], delta_len: int) -> int | None:
    """Index in text where the first stop string begins, looking only where the new delta could complete one."""
    best = None
    for s in stops:
        if not s:
            continue
        start = max(0, len(text) - delta_len - len(s) + 1)
        j = text.find(s, start)
        if j >= 0 and (best is None or j < best):
            best = j
    return best
