"""`triattn chat`: the Textual app. The engine runs in worker threads; the UI only reacts to the messages they post.

Layout: the conversation (left), the KV panel and the retention heatmap (right), the message box and the status
bar (bottom). One engine job at a time (loading a model, applying a policy, generating a reply): `busy` says which.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen

from ..errors import UserError
from ..files import write_atomic
from .chat_input import ChatInput
from .commands import COMMANDS, SlashCommand, help_markdown, parse, parse_budget
from .config import ChatConfig
from .conversation import ChatMessage, Conversation
from .heatmap import RetentionHeatmap
from .kv_panel import KVPanel
from .messages import AssistantMessage, Notice, UserMessage
from .session import ChatSession, check_model, load_chat_session
from .status_bar import StatusBar
from .store import ChatStore, StoreError
from .stream import Chunk, Failed, Finished, FirstToken, KVUpdate, ThinkingEnded, relay
from .turns import opens_thinking

NARROW = 70  # below this width the sidebar hides, so the conversation stays readable


class StatusText(Message):
    def __init__(self, text: str):
        super().__init__()
        self.text = text


class EngineReady(Message):
    """A model was loaded or a new policy applied."""

    def __init__(self, chat: ChatSession):
        super().__init__()
        self.chat = chat


class EngineFailed(Message):
    def __init__(self, error: str):
        super().__init__()
        self.error = error


def describe(error: BaseException) -> str:
    """One line for an error: a UserError's own message, else its type and text."""
    return str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"


class ChatApp(App):
    TITLE = "triattn chat"
    CSS = """
    #main { height: 1fr; }
    #conversation { width: 1fr; scrollbar-size-vertical: 1; }
    #sidebar { width: 32; }
    Screen.-narrow #sidebar { display: none; }
    """
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (NARROW, "-wide")]  # the sidebar hides on narrow terminals
    BINDINGS = [Binding("escape", "stop", "Stop generating", show=False)]

    def __init__(self, config: ChatConfig, store: ChatStore, conversation: Conversation | None = None,
                 chat: ChatSession | None = None,
                 loader: Callable[..., ChatSession] = load_chat_session,
                 clock: Callable[[], float] = time.monotonic):
        """chat: an engine already loaded (tests, scripts), else `loader(config, notify)` loads one in a thread.
        clock: what the shown durations are measured with (a fake one makes screenshots reproducible)."""
        super().__init__()
        self.config = config
        self.store = store
        self.conversation = conversation or Conversation(config.model, config.system, {"budget": config.budget})
        self.chat = chat
        self.loader = loader
        self.clock = clock
        self.busy: str | None = None  # "loading" | "configuring" | "generating"
        self.reply: ChatMessage | None = None
        self.reply_view: AssistantMessage | None = None
        self.unsaved: list[tuple[Conversation, ChatMessage]] = []  # replies the store refused; saved with the next

    # ---- layout ----------------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            yield VerticalScroll(id="conversation")
            with Vertical(id="sidebar"):
                yield KVPanel(id="kv")
                yield RetentionHeatmap(id="heatmap")
        yield ChatInput(id="input")
        yield StatusBar(self.config.model, id="status")

    async def on_mount(self) -> None:
        log = self.query_one("#conversation", VerticalScroll)
        log.anchor()
        for message in self.conversation.messages:
            await self._mount_message(message)
        self.query_one("#input").focus()
        if self.chat is not None:
            self._use(self.chat)
        else:
            self._load(self.config)

    async def _mount_message(self, message: ChatMessage) -> None:
        log = self.query_one("#conversation", VerticalScroll)
        if message.role == "user":
            await log.mount(UserMessage(message.content))
        else:
            view = AssistantMessage()
            await log.mount(view)
            await view.restore(message)

    def on_unmount(self) -> None:
        """Quitting mid-reply: stop the generation thread and keep what was generated so far."""
        if self.busy == "generating":
            self.chat.cancel()
            self.reply.finish = "cancelled"
            self._end_reply()

    async def notice(self, markdown: str, error: bool = False) -> None:
        await self.query_one("#conversation").mount(Notice(markdown, error=error))

    def _status(self, **fields: str) -> None:
        self.query_one(StatusBar).set(**fields)

    # ---- engine: load and configure (threads) -----------------------------------------------------------------

    def _use(self, chat: ChatSession) -> None:
        """Show a freshly loaded or reconfigured engine: its backend and an empty cache."""
        self.chat = chat
        shape = chat.engine.shape
        self.query_one(RetentionHeatmap).reset(shape.num_layers, shape.num_kv_heads)
        self.query_one(KVPanel).show(chat.metrics())
        method = chat.config.method if chat.config.budget is not None else "full attention"
        where = f"{chat.engine.backend}/{chat.device}" if chat.device else chat.engine.backend
        self._status(model=chat.config.model, backend=f"{where} · {method}", state="ready")

    def _load(self, config: ChatConfig) -> None:
        self.busy = "loading"
        self._status(model=config.model, state=f"loading {config.model}…")
        self._load_thread(config)

    @work(thread=True, exclusive=True, group="engine")
    def _load_thread(self, config: ChatConfig) -> None:
        try:
            chat = self.loader(config, lambda text: self.post_message(StatusText(text)))
        except Exception as e:  # noqa: BLE001 - shown in the app, which stays usable
            self.post_message(EngineFailed(f"cannot load {config.model}: {describe(e)}"))
        else:
            self.post_message(EngineReady(chat))

    @work(thread=True, exclusive=True, group="engine")
    def _configure_thread(self, chat: ChatSession, config: ChatConfig) -> None:
        try:
            chat.reconfigure(config, lambda text: self.post_message(StatusText(text)))
        except Exception as e:  # noqa: BLE001
            self.post_message(EngineFailed(describe(e)))
        else:
            self.post_message(EngineReady(chat))

    @on(StatusText)
    def _on_status_text(self, message: StatusText) -> None:
        self._status(state=message.text)

    @on(EngineReady)
    def _on_engine_ready(self, message: EngineReady) -> None:
        self.busy = None
        self.config = message.chat.config
        self.conversation.model = self.config.model
        self.conversation.settings = {"budget": self.config.budget}
        if self.conversation.id is not None:
            self._save_quietly(self.store.save_conversation, self.conversation)
        self._use(message.chat)

    @on(EngineFailed)
    async def _on_engine_failed(self, message: EngineFailed) -> None:
        self.busy = None
        self._status(state="error" if self.chat is None else "ready")
        if self.chat is None:
            self.query_one(KVPanel).update("no model")
        await self.notice(message.error, error=True)

    # ---- sending and streaming --------------------------------------------------------------------------------

    @on(ChatInput.Submitted)
    async def _on_submitted(self, event: ChatInput.Submitted) -> None:
        text = event.text
        box = self.query_one(ChatInput)
        if not text.strip():
            return
        if text.lstrip().startswith("/"):
            box.clear()
            await self.run_command(text)
            return
        if self.busy:
            self.notify(f"wait: {self.busy} (Esc stops generating)", severity="warning")
            return
        if self.chat is None:
            await self.notice("no model is loaded: `/model NAME` loads one", error=True)
            return
        if await self.send(text):
            box.clear()  # only once the message is saved: else it stays in the box to send again

    async def send(self, text: str) -> bool:
        """Save the user's message, then generate the reply in a thread. False, with the error shown, when the
        store refuses it (locked, corrupt, disk full): nothing is sent and the text stays in the box."""
        message = ChatMessage("user", text)
        try:
            while self.unsaved:  # replies the store refused before, in order
                self.store.add_message(*self.unsaved[0])
                self.unsaved.pop(0)
            self.store.add_message(self.conversation, message)
        except StoreError as e:
            await self.notice(f"{e}; your message was not sent (it is still in the box: press Enter to retry)",
                              error=True)
            self._status(state="not saved")
            return False
        self.conversation.messages.append(message)
        log = self.query_one("#conversation", VerticalScroll)
        await log.mount(UserMessage(text))
        if not self.chat.in_sync:  # the whole conversation is prefilled into an empty cache: forget old rounds
            self.query_one(RetentionHeatmap).reset(self.chat.engine.shape.num_layers,
                                                   self.chat.engine.shape.num_kv_heads)
        self.reply = ChatMessage("assistant", "")
        self.reply_view = AssistantMessage()
        await log.mount(self.reply_view)
        log.anchor()
        self.busy = "generating"
        self._status(state="prefilling…", speed="", ttft="")
        self._generate_thread(self.chat, self.conversation.system, self.conversation.history())
        return True

    @work(thread=True, exclusive=True, group="generate")
    def _generate_thread(self, chat: ChatSession, system: str | None, history: list[dict]) -> None:
        try:
            ids = chat.prompt_ids(system, history)
            thinking = opens_thinking(chat.engine.tokenizer, ids)
            for message in relay(chat.generate(ids), chat.metrics, self.clock, starts_thinking=thinking):
                self.post_message(message)
        except Exception as e:  # noqa: BLE001 - a backend error mid-stream: shown, the app stays usable
            chat.invalidate()  # the cache may hold half a step: prefill the conversation again next time
            self.post_message(Failed(describe(e)))

    @on(FirstToken)
    def _on_first_token(self, message: FirstToken) -> None:
        self._status(state="generating", ttft=f"TTFT {message.seconds:.2f} s")

    @on(Chunk)
    async def _on_chunk(self, chunk: Chunk) -> None:
        self.reply.content += chunk.raw
        await self.reply_view.add(chunk.thinking, chunk.answer)
        if chunk.tokens_per_second:
            self._status(speed=f"{chunk.tokens_per_second:.1f} tok/s")
        if chunk.metrics is not None:
            self._show_kv(chunk.metrics)

    @on(ThinkingEnded)
    def _on_thinking_ended(self, message: ThinkingEnded) -> None:
        self.reply.thought_seconds = message.seconds
        self.reply_view.end_thinking(message.seconds)

    @on(KVUpdate)
    def _on_kv_update(self, message: KVUpdate) -> None:
        if message.record is not None:
            self.query_one(RetentionHeatmap).update_round(message.record, message.metrics.logical_tokens)
        self._show_kv(message.metrics)

    def _show_kv(self, metrics) -> None:
        self.query_one(KVPanel).show(metrics)
        self.query_one(RetentionHeatmap).set_logical(metrics.logical_tokens)

    @on(Finished)
    def _on_finished(self, message: Finished) -> None:
        done = message.done
        self.reply.finish = done.finish_reason
        self._end_reply()
        self.reply_view.finish(done.finish_reason)
        self._show_kv(done.metrics)
        state = {"cancelled": "stopped", "length": "ready (token limit)"}.get(done.finish_reason, "ready")
        self._status(state=state, speed=f"{done.decode_tokens_per_second:.1f} tok/s")

    @on(Failed)
    async def _on_failed(self, message: Failed) -> None:
        self.reply.finish, self.reply.error = "error", message.error
        self._end_reply()
        self.reply_view.show_error(message.error)
        self._status(state="error (see the reply)")
        self.notify(message.error, severity="error", title="generation failed")

    def _end_reply(self) -> None:
        self.conversation.messages.append(self.reply)
        self.busy = None
        try:
            self.store.add_message(self.conversation, self.reply)
        except StoreError as e:
            self.unsaved.append((self.conversation, self.reply))
            self._tell(f"{e}; the reply is kept here and saved with your next message")

    def _save_quietly(self, save, *args) -> None:
        """A store write whose failure is only shown (settings, the system prompt): the next write tries again."""
        try:
            save(*args)
        except StoreError as e:
            self._tell(str(e))

    def _tell(self, error: str) -> None:
        try:
            self.notify(error, severity="error", title="chat store", timeout=10)
        except Exception:  # noqa: BLE001 - quitting: the app is gone; run_chat reports what was not saved
            pass

    def action_stop(self) -> None:
        """Esc: ask the engine to stop after the current step (Session.cancel is thread-safe)."""
        if self.busy == "generating":
            self.chat.cancel()
            self._status(state="stopping…")

    # ---- slash commands ---------------------------------------------------------------------------------------

    async def run_command(self, line: str) -> None:
        try:
            command, arg = parse(line)
            if command.name != "/help" and command.name != "/save" and self.busy:
                raise UserError(f"{command.name}: wait, {self.busy} (Esc stops generating)")
            await getattr(self, "command_" + command.name[1:])(arg)
        except UserError as e:
            await self.notice(str(e), error=True)

    async def command_budget(self, arg: str) -> None:
        config = self.config.with_(budget=parse_budget(arg))  # validated: UserError on a bad budget
        if self.chat is None:
            self.config = config
            self.conversation.settings = {"budget": config.budget}
            return
        self.busy = "configuring"
        self._status(state="applying the budget…")
        self._configure_thread(self.chat, config)
        what = f"KV budget {config.budget:,} tokens" if config.budget is not None else "full attention"
        await self.notice(f"{what}; the conversation is prefilled again with the next message")

    async def command_system(self, arg: str) -> None:
        self.conversation.system = arg or None
        if self.chat is not None:
            self.chat.invalidate()
        if self.conversation.id is not None:
            self._save_quietly(self.store.save_conversation, self.conversation)
        await self.notice(f"system prompt: {arg}" if arg else "system prompt cleared")

    async def command_clear(self, arg: str) -> None:
        self.conversation = Conversation(self.config.model, self.conversation.system, {"budget": self.config.budget})
        await self.query_one("#conversation").remove_children()
        if self.chat is not None:
            self.chat.clear()
            self._use(self.chat)
        await self.notice("new conversation (the previous one stays saved: `triattn chat --resume` reopens the last)")

    async def command_save(self, arg: str) -> None:
        path = Path(arg).expanduser()
        if not path.parent.is_dir():
            raise UserError(f"cannot write {path}: no folder {path.parent}")
        write_atomic(path, self.conversation.to_markdown().encode("utf-8"), private=True)  # UserError on failure
        await self.notice(f"saved {len(self.conversation.messages)} messages to `{path}`")

    async def command_model(self, arg: str) -> None:
        check_model(arg, self.config.backend)
        self._load(self.config.with_(model=arg))

    async def command_help(self, arg: str) -> None:
        await self.notice(help_markdown())

    # ---- command palette --------------------------------------------------------------------------------------

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for command in COMMANDS:
            yield SystemCommand(command.usage, command.help, partial(self._palette, command))

    def _palette(self, command: SlashCommand) -> None:
        """Commands with an argument are put into the message box to complete; the others run at once."""
        if command.takes_arg:
            box = self.query_one(ChatInput)
            box.text = command.name + " "
            box.move_cursor(box.document.end)
            box.focus()
        else:
            self.run_worker(self.run_command(command.name))
