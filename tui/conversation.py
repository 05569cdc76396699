"""A conversation as the chat keeps it: messages with the raw reply text, and its Markdown transcript (/save)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .thinking import split_reply


def thought_label(seconds: float | None) -> str:
    """'Thought for 12 s' (tenths under 10 s), or 'Thought' when the time is unknown."""
    if seconds is None:
        return "Thought"
    return f"Thought for {seconds:.1f} s" if seconds < 10 else f"Thought for {seconds:.0f} s"


@dataclass
class ChatMessage:
    role: str  # "user" | "assistant"
    content: str  # an assistant's raw reply as generated, <think> block included
    thought_seconds: float | None = None
    finish: str | None = None  # stop | length | cancelled | error
    error: str | None = None


@dataclass
class Conversation:
    model: str
    system: str | None = None
    settings: dict = field(default_factory=dict)  # what /budget set, restored by --resume: {"budget": int | None}
    messages: list[ChatMessage] = field(default_factory=list)
    id: int | None = None  # set once stored

    @property
    def title(self) -> str:
        first = next((m.content for m in self.messages if m.role == "user"), "")
        line = first.strip().splitlines()[0] if first.strip() else "new conversation"
        return line[:60]

    def history(self) -> list[dict]:
        """Messages for the chat template (replies as generated, so a re-prefill matches what was cached)."""
        return [{"role": m.role, "content": m.content} for m in self.messages]

    def to_markdown(self) -> str:
        out = [f"# {self.title}", "", f"Model: `{self.model}`", ""]
        if self.system:
            out += ["## System", "", self.system, ""]
        for m in self.messages:
            if m.role == "user":
                out += ["## User", "", m.content, ""]
                continue
            thinking, answer, thought = split_reply(m.content)
            out += ["## Assistant", ""]
            if thought:
                out += ["<details>", f"<summary>{thought_label(m.thought_seconds)}</summary>", "",
                        thinking.strip("\n"), "", "</details>", ""]
            out += [answer.strip("\n"), ""]
            if m.error:
                out += [f"> error: {m.error}", ""]
            elif m.finish in ("length", "cancelled"):
                out += [f"> ({'stopped' if m.finish == 'cancelled' else 'cut at the token limit'})", ""]
        return "\n".join(out).rstrip("\n") + "\n"
