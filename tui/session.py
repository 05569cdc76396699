"""A conversation's engine and Session, and what its KV cache already holds, for any backend.

The chat feeds only a new turn's tokens when the cache holds the conversation up to the last reply ("in sync");
after a new policy, system prompt, model, resume or an error it is out of sync and the whole conversation is
prefilled again into an empty cache."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from ..engine import CompressionSettings, DoneEvent, Engine, Event, KVMetrics, TokenEvent
from .config import ChatConfig
from .turns import conversation_ids, next_turn_ids


def needs_stats(config: ChatConfig) -> bool:
    return config.budget is not None and config.method == "triattention"


def load_stats(engine: Engine, config: ChatConfig, notify: Callable[[str], None]):
    """TriAttention stats when the policy needs them: --stats, next to the model, cached, or calibrated once."""
    if not needs_stats(config):
        return None
    from ..stats_cache import find_stats, resolve_stats

    if not config.stats and find_stats(Path(engine.model_path)) is None:
        notify("calibrating TriAttention stats for this model (once)…")
    return resolve_stats(engine, config.stats)


def check_model(model: str, backend: str) -> None:
    """UserError now, before anything loads, for a model name or path that cannot be found."""
    from ..backends import choose_backend
    from ..errors import UserError
    from ..registry import resolve_model

    if not resolve_model(model, backend=choose_backend(backend)[0]).exists():
        raise UserError(f"{model}: no such model directory")


def load_chat_session(config: ChatConfig, notify: Callable[[str], None] = lambda _: None) -> "ChatSession":
    """Load config.model with its backend (slow: run it off the UI thread)."""
    from ..backends import llamacpp_runs, load_engine

    notify(f"loading {config.model}…")
    engine = load_engine(config.model, backend=config.backend, device=config.device, dtype=config.dtype,
                         llamacpp_ok=llamacpp_runs(config.budget is not None, config.method, config.pruning_mode,
                                                   config.dtype))
    return ChatSession(engine, config, load_stats(engine, config, notify))


class ChatSession:
    """One engine and one Session; knows whether the cache holds the conversation so far."""

    def __init__(self, engine: Engine, config: ChatConfig, stats=None):
        self.engine = engine
        self.config = config
        self.stats = stats
        self.session = engine.session(self._settings())
        self.in_sync = False  # the cache holds the conversation up to the end of the last reply
        self.unfed: list[int] = []  # the last sampled token when the engine stopped before feeding it

    def _settings(self) -> CompressionSettings:
        policy = self.config.policy()
        if policy is None:
            return CompressionSettings(policy=None)
        stats = self.stats if self.config.method == "triattention" else None
        return CompressionSettings(policy=policy, stats=stats, method=self.config.method)

    @property
    def device(self) -> str:
        """'cpu', 'cuda', 'gpu' …, or '' when the backend does not say (mlx has Device objects, llama.cpp none)."""
        device = getattr(self.engine, "device", None)
        if device is None:
            return ""
        kind = getattr(device, "type", None)
        return getattr(kind, "name", None) or str(device)

    def reconfigure(self, config: ChatConfig, notify: Callable[[str], None] = lambda _: None) -> None:
        """A new policy (e.g. /budget): a fresh Session; the conversation is prefilled again on the next turn."""
        stats = self.stats if self.stats is not None else load_stats(self.engine, config, notify)
        self.config, self.stats = config, stats
        self.session = self.engine.session(self._settings())
        self.in_sync = False

    def invalidate(self) -> None:
        """The cache no longer matches the conversation (system prompt changed, history cleared)."""
        self.in_sync = False

    def clear(self) -> None:
        """Empty the cache (a new conversation)."""
        self.session.reset()
        self.in_sync = False

    def prompt_ids(self, system: str | None, history: list[dict]) -> list[int]:
        """Tokens to feed for the reply to history[-1] (a user message): the new turn only when in sync."""
        tokenizer = self.engine.tokenizer
        if self.in_sync:
            return self.unfed + next_turn_ids(tokenizer, system, history[-1]["content"])
        self.session.reset()
        return conversation_ids(tokenizer, system, history)

    def generate(self, prompt_ids: list[int]) -> Iterator[Event]:
        """The engine's events for one reply; when it ends normally the cache is in sync with the conversation."""
        self.in_sync, self.unfed = False, []
        last = None
        for event in self.session.generate(prompt_ids, self.config.sampling()):
            if isinstance(event, TokenEvent):
                last = event.token_id
            elif isinstance(event, DoneEvent):
                # The engine feeds every sampled token except the last one of a reply that ended by length or stop;
                # an end-of-sequence token is left out on purpose: the chat template closes the turn itself.
                ended_early = event.finish_reason in ("length", "stop") and last is not None
                eos = last in self.engine.eos_token_ids()
                self.unfed = [last] if ended_early and not eos else []
                self.in_sync = True
            yield event

    def cancel(self) -> None:
        self.session.cancel()

    def metrics(self) -> KVMetrics:
        return self.session.metrics()
