"""The conversation's widgets: user messages, streamed assistant replies (reasoning folded away), and notices."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Collapsible, Markdown, Static

from .conversation import ChatMessage, thought_label
from .thinking import split_reply


class UserMessage(Static):
    DEFAULT_CSS = """
    UserMessage { border-left: thick $primary; padding: 0 1; margin: 1 1 0 4; background: $boost; }
    """

    def __init__(self, text: str):
        super().__init__(Text(text))  # plain text: user input is not markup
        self.text = text


class Notice(Markdown):
    """An app message in the conversation (/help, what a command did, errors); not part of the chat history."""

    DEFAULT_CSS = """
    Notice { margin: 1 1 0 1; padding: 0 1; color: $text-muted; border-left: thick $secondary; }
    Notice.error { color: $text-error; border-left: thick $error; }
    """

    def __init__(self, markdown: str, error: bool = False):
        super().__init__(markdown, classes="error" if error else "")


class AssistantMessage(Vertical):
    """One reply. Reasoning streams into a collapsible block that folds ("Thought for 12 s") when the answer
    starts; the answer streams as Markdown, appended incrementally (only the last block is re-parsed)."""

    DEFAULT_CSS = """
    AssistantMessage { height: auto; border-left: thick $success; padding: 0 0 0 1; margin: 1 1 0 1; }
    AssistantMessage Collapsible { display: none; padding-bottom: 0; background: $surface; border-top: none; }
    AssistantMessage Collapsible.shown { display: block; }
    AssistantMessage #thinking { color: $text-muted; }
    AssistantMessage #answer { margin: 0; padding: 0; background: transparent; }
    AssistantMessage #answer > * { margin-bottom: 0; }
    AssistantMessage #waiting { color: $text-muted; }
    AssistantMessage #error { display: none; color: $text-error; }
    AssistantMessage #note { display: none; color: $text-muted; }
    """

    def __init__(self):
        super().__init__()
        self.thinking = ""
        self.answer = ""

    def compose(self) -> ComposeResult:
        yield Static("…", id="waiting")
        with Collapsible(title="Thinking…", collapsed=False):
            yield Static("", id="thinking")
        yield Markdown("", id="answer")
        yield Static("", id="error")
        yield Static("", id="note")

    async def add(self, thinking: str, answer: str) -> None:
        """Append streamed text (already batched by the generation thread)."""
        if thinking or answer:
            self.query_one("#waiting").display = False
        if thinking:
            self.thinking += thinking
            self.query_one(Collapsible).add_class("shown")
            self.query_one("#thinking", Static).update(Text(self.thinking.strip("\n")))
        if answer:
            if not self.answer:
                answer = answer.lstrip("\n")
            self.answer += answer
            if answer:
                await self.query_one("#answer", Markdown).append(answer)

    def end_thinking(self, seconds: float | None) -> None:
        block = self.query_one(Collapsible)
        block.title = thought_label(seconds)
        block.collapsed = True

    def show_error(self, error: str) -> None:
        self.query_one("#waiting").display = False
        label = self.query_one("#error", Static)
        label.update(Text(f"error: {error}"))
        label.display = True

    def finish(self, reason: str) -> None:
        self.query_one("#waiting").display = False
        note = {"cancelled": "(stopped)", "length": "(cut at the token limit)"}.get(reason)
        if note:
            label = self.query_one("#note", Static)
            label.update(note)
            label.display = True
        if reason != "stop" and self.thinking and not self.answer:  # stopped while reasoning: keep it readable
            self.query_one(Collapsible).title = "Thinking (unfinished)"

    async def restore(self, message: ChatMessage) -> None:
        """Show a stored reply (after --resume) as it ended."""
        thinking, answer, thought = split_reply(message.content)
        await self.add(thinking, answer)
        if thought and answer:
            self.end_thinking(message.thought_seconds)
        if message.error:
            self.show_error(message.error)
        self.finish(message.finish or "stop")
