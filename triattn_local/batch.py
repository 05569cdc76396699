"""Batched generation: many prompts of the same length at once, each sequence with its own compressed cache.

For benchmarks (many problems of one prompt length on a GPU). Backend-independent, on top of the engine's
ModelRunner: the rows advance in lockstep (same positions, same slot count T, so rounds happen at the same steps),
each row has its own CompressionState (its own kept positions), its own Sampler (seeded params.seed + row) and its
own stop conditions; a finished row leaves the batch (runner.select_rows), so compute shrinks as rows finish. A row
gives the same tokens as running its prompt alone through Session.generate with the same settings (greedy).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .compression import CompressionState, RoundRecord
from .engine import (CompressionSettings, Engine, KVMetrics, StreamingDetokenizer, _find_stop, keep_logits_on_device,
                     kv_metrics)
from .errors import UserError
from .methods import make_scorer
from .policy import PREFILL_TOKENS
from .sampling import Sampler, SamplingParams


@dataclass
class BatchResult:
    token_ids: list[int]  # every sampled token, an EOS included (as Session's TokenEvents)
    text: str  # the decoded completion, cut before the stop string that ended it (Session's stream, which cannot
    # take text back, may already have shown the part of a stop string that came in earlier tokens)
    finish_reason: str  # "stop" | "length"
    metrics: KVMetrics  # the row's KV when it finished: peak retained tokens, rounds, kv bytes …
    forced_errors: int = 0  # teacher forcing: steps whose greedy token was not the forced one


class _Row:
    """One sequence of the batch: its compression state, sampler, text and stop conditions."""

    def __init__(self, index: int, engine: Engine, settings: CompressionSettings, scorer, params: SamplingParams,
                 prompt_len: int, forced: list[int] | None = None):
        self.index = index
        self.forced = forced
        self.forced_errors = 0
        self.state: CompressionState | None = None
        if scorer is not None:
            shape = engine.shape
            self.state = CompressionState(settings.policy, scorer, shape.num_layers, shape.num_kv_heads,
                                          settings.group_aggregation)
            self.state.prompt_len = prompt_len
        seed = None if params.seed is None else params.seed + index
        self.sampler = Sampler(replace(params, seed=seed))
        self.detok = StreamingDetokenizer(engine.tokenizer)
        self.tokens: list[int] = []
        self.text = ""
        self.finish: str | None = None
        self.metrics: KVMetrics | None = None

    def take(self, logits: np.ndarray, eos: set[int], stops: list[str]) -> bool:
        """Sample the next token from this row's logits [vocab]; True when it ends the row (EOS or a stop string).
        Under teacher forcing the next forced token is taken instead, and a greedy miss is counted."""
        if self.forced is not None:
            token = self.forced[len(self.tokens)]
            self.forced_errors += int(logits.argmax()) != token
            self.tokens.append(token)
            if len(self.tokens) == len(self.forced):
                self.finish = "stop"
                return True
            return False
        token = self.sampler(logits)
        self.tokens.append(token)
        if token in eos:
            self.finish = "stop"
            return True
        delta = self.detok.add(token)
        if delta:
            self.text += delta
            hit = _find_stop(self.text, stops, len(delta))
            if hit is not None:
                self.text = self.text[:hit]
                self.finish = "stop"
                return True
        return False


def generate_batch(engine: Engine, prompts: list[list[int]], settings: CompressionSettings, params: SamplingParams,
                   progress: bool = False,
                   on_round: Callable[[int, RoundRecord], None] | None = None,
                   forced: list[list[int]] | None = None) -> list[BatchResult]:
    """Generate a completion for every prompt (all of the same length), in one batch. Results are in prompt order.

    on_round(row, record), if given, is called for every row's compression round (row: index into prompts).
    forced (teacher forcing): each row is fed these tokens instead of sampling (params.max_tokens must cover
    them), and its result counts the steps where the greedy token differed (forced_errors)."""
    if not prompts:
        return []
    length = len(prompts[0])
    if length == 0 or any(len(p) != length for p in prompts):
        lengths = sorted({len(p) for p in prompts})
        raise UserError(f"batched prompts must all have the same, non-zero length (got lengths {lengths})")
    scorer = make_scorer(settings, engine.shape) if settings.enabled else None
    rows = [_Row(i, engine, settings, scorer, params, length, None if forced is None else forced[i])
            for i in range(len(prompts))]
    active = list(rows)  # the runner's batch, in order
    runner = engine.new_runner(scorer, settings.policy.capacity if settings.enabled else None)
    keep_logits_on_device(runner)
    runner.reset()
    eos = engine.eos_token_ids()
    logical = 0  # tokens every active row has been fed

    def feed(token_ids: np.ndarray) -> np.ndarray:
        """Run tokens [len(active), n] through the model in chunks, with compression rounds as the policy says
        (the same chunks and rounds as Session._feed); return the logits [len(active), vocab] of the last."""
        nonlocal logical
        lead = active[0].state  # every row's state has the same slot count and positions count
        i, logits = 0, None
        while i < token_ids.shape[1]:
            n = settings.policy.prefill_chunk(lead.retained) if lead is not None else PREFILL_TOKENS
            chunk = token_ids[:, i:i + n]
            logits = runner.forward(chunk, logical)
            logical += chunk.shape[1]
            i += chunk.shape[1]
            if lead is not None:
                for row in active:
                    row.state.appended(chunk.shape[1])
                if lead.needs_compression():
                    if hasattr(runner, "compress"):  # the runner plans every row's round on its device
                        records = runner.compress([row.state for row in active], scorer)
                    else:
                        scores = runner.head_scores(scorer, lead.round_start)  # [B, layers, heads, T]
                        keep, records = [], []
                        for row, row_scores in zip(active, scores):
                            row_keep, record = row.state.plan(row_scores)
                            keep.append(row_keep)
                            records.append(record)
                        runner.compact(np.stack(keep))
                    if on_round is not None:
                        for row, record in zip(active, records):
                            on_round(row.index, record)
        return logits

    def finish(row: _Row, reason: str | None = None) -> None:
        row.finish = row.finish or reason
        row.metrics = kv_metrics(engine, settings, row.state, logical, logical)

    with _progress(progress, params.max_tokens, len(rows)) as advance:
        logits = feed(np.asarray(prompts, dtype=np.int64))
        for generated in range(1, params.max_tokens + 1):
            going = []
            for b, row in enumerate(active):
                if row.take(logits[b], eos, params.stop):
                    finish(row)
                else:
                    going.append(b)
            advance(len(going))
            if generated == params.max_tokens or not going:
                for b in going:
                    finish(active[b], "length")
                break
            if len(going) < len(active):  # finished rows leave the batch
                runner.select_rows(going)
                active = [active[b] for b in going]
            logits = feed(np.array([[row.tokens[-1]] for row in active], dtype=np.int64))
    return [BatchResult(row.tokens, row.text, row.finish, row.metrics, row.forced_errors) for row in rows]


@contextmanager
def _progress(enabled: bool, steps: int, batch: int):
    """Yield advance(active_rows): a transient rich progress bar over decode steps on stderr, or a no-op."""
    if not enabled:
        yield lambda active: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TextColumn("steps ·"),
               TextColumn("{task.fields[active]} of " + str(batch) + " rows going"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("generating", total=steps, active=batch)
        yield lambda active: bar.update(task, advance=1, active=active)
