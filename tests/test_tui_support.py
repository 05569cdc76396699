"""Helpers for the chat tests (no tests here): a scripted engine for what the real demo model cannot do on demand
(a fixed reply for reproducible snapshots, a backend that fails mid-stream), a fake clock, and pilot waits.

The scripted engine is a real Engine: its replies go through the real Session loop, compression rounds and budget
policy; only the model is replaced by a runner whose logits spell out the script."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from triattn_local.engine import DoneEvent, Engine, Session
from triattn_local.registry import demo_model_dir
from triattn_local.rope import ModelShape


class ScriptedRunner:
    """A batch-of-one ModelRunner: after a prompt, the logits spell out the engine's next scripted reply, then EOS.

    It tracks its cache's positions per (layer, KV head) like a backend, so compaction and scoring see real shapes;
    scores are a fixed function of position, layer and head, so the rounds keep different positions per layer."""

    def __init__(self, engine: "ScriptedEngine"):
        self.engine = engine
        self.reset()

    def reset(self) -> None:
        s = self.engine.shape
        self.positions = np.zeros((s.num_layers, s.num_kv_heads, 0), dtype=np.int64)
        self.script: list[int] = []
        self.k = 0
        self.expected: int | None = None
        self.replying = True  # the next prompt forward starts a new reply

    def forward(self, token_ids, start_position: int) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64)[0]
        s = self.engine.shape
        new = np.broadcast_to(np.arange(start_position, start_position + len(ids)), (s.num_layers, s.num_kv_heads,
                                                                                     len(ids)))
        self.positions = np.concatenate([self.positions, new], axis=-1)
        if len(ids) == 1 and self.expected is not None and int(ids[0]) == self.expected:
            self.k += 1  # the sampled token came back: generating
            self.replying = True
            self.engine.steps += 1
            if self.engine.fail_after is not None and self.engine.steps > self.engine.fail_after:
                self.engine.fail_after = None  # fail once
                raise RuntimeError("backend exploded: device lost mid-stream")
        else:
            if self.replying:  # a new prompt after a reply (or the first one): take the next scripted reply
                self.script = self.engine.next_reply()
                self.replying = False
            self.k = 0
        token = self.script[self.k] if self.k < len(self.script) else self.engine.eos
        self.expected = token
        logits = np.full((1, self.engine.vocab), -10.0, dtype=np.float32)
        logits[0, token] = 10.0
        return logits

    def head_scores(self, scorer, round_start: int) -> np.ndarray:
        s = self.engine.shape
        layer = np.arange(s.num_layers)[:, None, None]
        head = np.arange(s.num_heads)[None, :, None]
        pos = self.positions[:, np.arange(s.num_heads) // (s.num_heads // s.num_kv_heads), :]
        return np.sin(pos * 0.05 * (layer + 1) + head)[None].astype(np.float32)

    def compact(self, keep: np.ndarray) -> None:
        self.positions = np.take_along_axis(self.positions, keep[0], axis=-1)

    def select_rows(self, rows) -> None:
        pass


class FixedTimingSession(Session):
    """DoneEvent with fixed prefill/decode seconds, so tok/s on screen does not depend on this machine."""

    def generate(self, prompt_ids, params, set_prompt=True):
        for event in super().generate(prompt_ids, params, set_prompt):
            if isinstance(event, DoneEvent):
                event.prefill_seconds = self.engine.prefill_seconds
                event.decode_seconds = event.generated_tokens / self.engine.tokens_per_second
            yield event


class ScriptedEngine(Engine):
    """The demo model's shape and tokenizer with scripted replies (one per turn; the last one repeats)."""

    backend = "scripted"
    device = "cpu"

    def __init__(self, replies: list[str], fail_after: int | None = None, tokens_per_second: float = 150.0,
                 prefill_seconds: float = 0.2):
        from transformers import AutoTokenizer

        path = demo_model_dir()
        self.model_path = path
        self.model_id = "demo"
        self.shape = ModelShape.from_model_dir(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.vocab = len(self.tokenizer)
        self.eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        s = self.shape
        self.kv_bytes_per_token = 2 * s.num_layers * s.num_kv_heads * s.head_dim * 2
        self.context_length = s.max_position_embeddings
        self.replies = [list(self.tokenizer.encode(r, add_special_tokens=False)) for r in replies]
        self.turn = 0
        self.steps = 0
        self.fail_after = fail_after  # raise in forward after this many generated tokens (once)
        self.tokens_per_second, self.prefill_seconds = tokens_per_second, prefill_seconds

    def next_reply(self) -> list[int]:
        reply = self.replies[min(self.turn, len(self.replies) - 1)]
        self.turn += 1
        return reply

    def new_runner(self, scorer=None, capacity=None) -> ScriptedRunner:
        return ScriptedRunner(self)

    def session(self, compression=None) -> Session:
        from triattn_local.engine import CompressionSettings

        return FixedTimingSession(self, compression or CompressionSettings(policy=None))


class FakeClock:
    """Returns the given times in order, then keeps adding one second: displayed durations become fixed."""

    def __init__(self, *times: float):
        self.times = list(times)
        self.last = 0.0

    def __call__(self) -> float:
        self.last = self.times.pop(0) if self.times else self.last + 1.0
        return self.last


async def wait_for(pilot, condition, timeout: float = 60.0, what: str = "condition") -> None:
    """Let the app run until condition() holds (the engine works in a thread)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)
    await pilot.pause()


async def wait_idle(pilot, app, timeout: float = 120.0) -> None:
    """Until no engine job runs and every message the worker posted has been handled."""
    await wait_for(pilot, lambda: app.busy is None, timeout, "the engine to finish")
    await app.workers.wait_for_complete()
    await pilot.pause()
    await asyncio.sleep(0)


def screen_text(app) -> str:
    """The screen as plain text: what a user sees, for asserting on the rendered panels."""
    import io

    from rich.console import Console

    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), record=True, legacy_windows=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


def scripted_app(tmp_path, replies, fail_after=None, clock=None, loader=None, **config):
    """A ChatApp on a ScriptedEngine with a small budget (so short replies already run compression rounds)."""
    from triattn_local.tui.app import ChatApp
    from triattn_local.tui.config import ChatConfig
    from triattn_local.tui.session import ChatSession, load_stats
    from triattn_local.tui.store import ChatStore

    settings = dict(temperature=0, budget=160, divide_length=32, window=32, sink=4)
    settings.update(config)
    cfg = ChatConfig(**settings)
    engine = ScriptedEngine(replies, fail_after)
    chat = ChatSession(engine, cfg, load_stats(engine, cfg, print))
    extra = {"loader": loader} if loader else {}
    return ChatApp(cfg, ChatStore(tmp_path / "chat.sqlite3"), chat=chat, clock=clock or FakeClock(), **extra)
