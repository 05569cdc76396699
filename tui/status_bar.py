"""The status bar: model, backend and device, what the engine is doing, and the speed of the last reply."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class StatusBar(Static):
    DEFAULT_CSS = """
    StatusBar { height: 1; background: $panel; color: $text; padding: 0 1; }
    """

    def __init__(self, model: str, **kwargs):
        super().__init__("", **kwargs)
        self.fields = {"model": model, "backend": "", "state": "loading", "speed": "", "ttft": ""}

    def set(self, **fields: str) -> None:
        self.fields.update(fields)
        f = self.fields
        text = Text(f["model"], style="bold")
        for part in (f["backend"], f["state"], f["speed"], f["ttft"]):
            if part:
                text.append(" · ", style="dim")
                text.append(part, style="bold red" if part.startswith("error") else "")
        hint = "Esc stop · ^P commands"
        pad = self.content_size.width - len(text) - len(hint)
        if pad >= 1:  # the hint only where it fits
            text.append(" " * pad + hint, style="dim")
        self.update(text)

    def on_resize(self) -> None:
        self.set()
