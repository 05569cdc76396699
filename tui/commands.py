"""Slash commands: what exists, how a line is parsed, and the help text (typed and command-palette use the same)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class SlashCommand:
    name: str
    usage: str
    help: str
    takes_arg: bool  # the palette fills "/name " into the input for these, and runs the others at once
    needs_arg: bool


COMMANDS = (
    SlashCommand("/budget", "/budget N", "KV tokens kept per layer and head; /budget off: full attention", True, True),
    SlashCommand("/system", "/system TEXT", "set the system prompt (/system alone clears it)", True, False),
    SlashCommand("/clear", "/clear", "start a new conversation (the old one stays saved)", False, False),
    SlashCommand("/save", "/save FILE", "write the conversation to FILE as Markdown", True, True),
    SlashCommand("/model", "/model NAME", "switch to another model: demo or a model directory", True, True),
    SlashCommand("/help", "/help", "show keys and commands", False, False),
)
BY_NAME = {c.name: c for c in COMMANDS}

KEYS = (
    ("Enter", "send"),
    ("Shift+Enter, Ctrl+J", "new line"),
    ("Esc", "stop generating"),
    ("Ctrl+P", "command palette"),
    ("Ctrl+Q", "quit"),
)


def parse(line: str) -> tuple[SlashCommand, str]:
    """'/budget 512' → (the /budget command, '512'). UserError for an unknown command or a missing argument."""
    name, _, arg = line.strip().partition(" ")
    command = BY_NAME.get(name.lower())
    if command is None:
        raise UserError(f"unknown command {name} (try /help)")
    arg = arg.strip()
    if command.needs_arg and not arg:
        raise UserError(f"usage: {command.usage}")
    return command, arg


def parse_budget(arg: str) -> int | None:
    """A budget in tokens, or None for full attention ('off')."""
    if arg.lower() in ("off", "none", "full"):
        return None
    try:
        return int(arg)
    except ValueError:
        raise UserError(f"/budget needs a number of tokens or 'off' (got {arg!r})") from None


def help_markdown() -> str:
    lines = ["**Keys**", ""]
    lines += [f"- `{key}`: {what}" for key, what in KEYS]
    lines += ["", "**Commands** (also in the command palette, Ctrl+P)", ""]
    lines += [f"- `{c.usage}`: {c.help}" for c in COMMANDS]
    return "\n".join(lines)
