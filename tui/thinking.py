"""Split a streamed reply into its <think> reasoning and its answer, even when a tag arrives cut across deltas."""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


class ThinkSplitter:
    """Feed text deltas; get back ("think" | "answer", text) pieces in order.

    A reply that starts (after whitespace) with <think> is reasoning until </think>; anything else is answer.
    The tags themselves are not passed on. Text that could be the start of a tag is held back until the next
    delta decides it, so a tag split over two deltas is still recognised."""

    def __init__(self, thinking: bool = False):
        self.state = "think" if thinking else "start"  # start | think | answer
        self.held = ""
        self.thought = thinking  # whether a reasoning block was opened

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.held += text
        out: list[tuple[str, str]] = []
        while self.held:
            if self.state == "start":
                stripped = self.held.lstrip()
                if stripped.startswith(OPEN):
                    self.state, self.thought = "think", True
                    self.held = stripped[len(OPEN):]
                elif stripped and not OPEN.startswith(stripped):
                    self.state = "answer"
                else:
                    break  # only whitespace or a partial "<think" so far
            elif self.state == "think":
                end = self.held.find(CLOSE)
                if end >= 0:
                    if end:
                        out.append(("think", self.held[:end]))
                    self.state, self.held = "answer", self.held[end + len(CLOSE):]
                    continue
                keep = _partial_suffix(self.held, CLOSE)
                if len(self.held) > keep:
                    out.append(("think", self.held[:len(self.held) - keep]))
                self.held = self.held[len(self.held) - keep:]
                break
            else:
                out.append(("answer", self.held))
                self.held = ""
        return out

    def finish(self) -> list[tuple[str, str]]:
        """The held-back text at the end of the stream (a tag that never completed is plain text)."""
        held, self.held = self.held, ""
        if not held:
            return []
        return [("think" if self.state == "think" else "answer", held)]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of text that is a proper beginning of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_reply(raw: str) -> tuple[str, str, bool]:
    """(thinking, answer, whether there was a reasoning block) of a whole stored reply. A reply with </think> but
    no <think> began inside a block the chat template opened (DeepSeek-R1 style)."""
    splitter = ThinkSplitter(thinking=CLOSE in raw and OPEN not in raw)
    parts = splitter.feed(raw) + splitter.finish()
    thinking = "".join(t for kind, t in parts if kind == "think")
    answer = "".join(t for kind, t in parts if kind == "answer")
    return thinking, answer, splitter.thought
