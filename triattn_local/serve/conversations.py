"""Kept conversations: a finished request's Session (its compressed KV cache) and what it stands for, so that the
next request of the same conversation continues from it instead of prefilling the whole history again.

A request continues a kept conversation in one of two ways, both decided on token ids:
- exact: its prompt ids start with every id the cache has consumed (raw completions that append to their text,
  or a chat whose template re-renders the reply exactly as generated): feed the rest;
- next turn: its messages start with the earlier request's messages plus the reply we gave (compared as messages:
  roles, text, tool calls; reasoning ignored), with the same tools and template options. The chat template may
  render that reply differently from what the model generated (Qwen3 drops earlier <think> blocks; tool-call JSON
  is re-serialised), so the prompt ids are not a prefix of the cache. Every turn of the template ends in one
  token (<|im_end|>: the last end-of-sequence token of the earlier prompt), so the new turns begin after its
  (k+1)-th occurrence in the new prompt, where k is its count in the earlier prompt. Feed the reply's last
  sampled token if it was not that token (a reply cut by max_tokens or a stop string), that token, then the rest.
The cache then holds the conversation as the model saw and wrote it (earlier reasoning included, compressed like
everything else), not the template's re-rendering of it.

Kept conversations are bounded by count and by KV bytes (least recently used go first).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

from .chat_format import parse_arguments
from .protocol import Message


def message_key(m: Message) -> tuple:
    """What of a message decides its rendering, ignoring reasoning and whitespace at the ends of assistant text
    (clients trim it) and tool-call ids (some clients renumber them)."""
    role = "system" if m.role == "developer" else m.role
    text = m.text().strip() if role == "assistant" else m.text()
    calls = tuple((c.function.name, _canonical(c.function.arguments)) for c in m.tool_calls or [])
    return (role, text, calls, m.tool_call_id if role == "tool" else None, m.name)


def reply_key(content: str, tool_calls: list[tuple[str, str]]) -> tuple:
    """The key of the assistant message we returned, as the client will send it back."""
    return ("assistant", content.strip(), tuple((name, _canonical(args)) for name, args in tool_calls), None, None)


def _canonical(arguments: str | dict) -> str:
    value = parse_arguments(arguments)
    return json.dumps(value, sort_keys=True, ensure_ascii=False) if isinstance(value, dict) else value


@dataclass
class Turn:
    """What a chat request is, for matching: its message keys and everything else that changes the rendering."""

    messages: list[tuple]
    context: str  # tools and chat_template_kwargs, as canonical JSON


@dataclass
class Conversation:
    session: object  # engine.Session, idle
    ids: list[int]  # every token id the cache has consumed, in order
    prompt_ids: list[int]  # the rendered prompt of the request that made it
    turn: Turn | None  # that request's turn plus our reply; None for raw completions
    unfed: list[int]  # the reply's last sampled token, never run through the model
    turn_end: int | None  # the token that ends every turn of the chat template; None: no turn matching
    kv_bytes: int


@dataclass
class Match:
    conversation: Conversation
    feed: list[int]  # what to run through the model now
    cached: int  # prompt tokens not prefilled again


class ConversationStore:
    def __init__(self, max_conversations: int, max_bytes: int):
        self.max_conversations = max_conversations
        self.max_bytes = max_bytes
        self._items: OrderedDict[int, Conversation] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()

    def put(self, conversation: Conversation) -> None:
        if self.max_conversations < 1 or conversation.kv_bytes > self.max_bytes:
            return
        with self._lock:
            self._items[self._next] = conversation
            self._next += 1
            while len(self._items) > self.max_conversations or self._bytes() > self.max_bytes:
                self._items.popitem(last=False)

    def take(self, prompt: list[int], turn: Turn | None, fits) -> Match | None:
        """Remove and return the kept conversation this prompt continues with the most reused tokens, if any.
        fits(conversation, feed) says whether continuing it stays inside the model's context."""
        with self._lock:
            best_key, best = None, None
            for key, c in self._items.items():
                found = continuation(c, prompt, turn)
                if found is None or not fits(c, found[0]):
                    continue
                if best is None or found[1] > best.cached:
                    best_key, best = key, Match(c, *found)
            if best is not None:
                del self._items[best_key]
            return best

    def sessions(self) -> list:
        with self._lock:
            return [c.session for c in self._items.values()]

    def __len__(self) -> int:
        return len(self._items)

    def _bytes(self) -> int:
        return sum(c.kv_bytes for c in self._items.values())


def continuation(c: Conversation, prompt: list[int], turn: Turn | None) -> tuple[list[int], int] | None:
    """(ids to feed so that c's cache stands for this whole prompt, prompt tokens it covers), or None when the
    prompt does not continue c."""
    n = len(c.ids)
    if len(prompt) > n and prompt[:n] == c.ids:
        return prompt[n:], n
    if turn is None or c.turn is None or c.turn_end is None or turn.context != c.turn.context:
        return None
    k = len(c.turn.messages)
    if len(turn.messages) <= k or turn.messages[:k] != c.turn.messages:
        return None
    j = _nth(prompt, c.turn_end, c.prompt_ids.count(c.turn_end) + 1)
    if j is None or j + 1 >= len(prompt):
        return None
    unfed = [t for t in c.unfed if t != c.turn_end]
    return unfed + prompt[j:], j


def _nth(ids: list[int], value: int, n: int) -> int | None:
    """Index of the n-th occurrence (1-based) of value in ids."""
    seen = 0
    for i, x in enumerate(ids):
        if x == value:
            seen += 1
            if seen == n:
                return i
    return None
