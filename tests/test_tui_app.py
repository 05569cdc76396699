"""`triattn chat` driven by the pilot on a scripted engine: what the demo model cannot do on demand (fixed replies,
a backend failing mid-stream), /save, --resume, the other commands, the palette, resizing and very long messages."""

import asyncio

from test_tui_support import ScriptedEngine, screen_text, scripted_app, wait_for, wait_idle
from textual.widgets import Collapsible

from triattn_local.tui.app import NARROW
from triattn_local.tui.chat_input import ChatInput
from triattn_local.tui.main import prepare
from triattn_local.tui.messages import AssistantMessage, Notice, UserMessage
from triattn_local.tui.session import ChatSession
from triattn_local.tui.store import ChatStore

REPLY = "<think>\n" + "".join(f"line {i}: keep {i % 7}\n" for i in range(12)) + "</think>\nThe answer is **42**."


async def send(pilot, app, text):
    app.query_one(ChatInput).text = text
    await pilot.press("enter")
    await wait_idle(pilot, app)


def errors(app):
    return [n.source for n in app.query(Notice) if n.has_class("error")]


def test_reasoning_folds_into_thought_for_n_seconds_when_the_answer_starts(tmp_path):
    from test_tui_support import FakeClock

    app = scripted_app(tmp_path, [REPLY], clock=FakeClock(0.0, 0.3, 1.0, 13.4))

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            await send(pilot, app, "think first")
            block = app.reply_view.query_one(Collapsible)
            assert block.collapsed and block.title == "Thought for 12 s"
            assert app.reply_view.answer == "The answer is **42**."
            assert app.query_one("StatusBar").fields["ttft"] == "TTFT 0.30 s"
            await pilot.click(block.query_one("CollapsibleTitle"))  # and it opens on demand
            assert not block.collapsed and "line 11: keep 4" in screen_text(app)

    asyncio.run(scenario())
    assert app.conversation.messages[-1].thought_seconds == 12.4


def test_backend_error_mid_stream_is_shown_and_the_app_stays_usable(tmp_path):
    app = scripted_app(tmp_path, [REPLY, "Second try works."], fail_after=12)

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            await send(pilot, app, "first")
            failed = app.reply_view
            assert "backend exploded" in str(failed.query_one("#error").render())
            assert failed.query_one("#error").display
            assert failed.thinking.startswith("\nline 0:")  # the text before the error stays
            assert app.query_one("StatusBar").fields["state"].startswith("error")
            assert not app.chat.in_sync  # the cache may be half-updated: prefill again next time
            assert "backend exploded" in screen_text(app)
            await send(pilot, app, "second")
            assert app.reply_view.answer == "Second try works."
            assert app.chat.in_sync

    asyncio.run(scenario())
    first, second = app.conversation.messages[1], app.conversation.messages[3]
    assert first.finish == "error" and "backend exploded" in first.error
    assert second.finish == "stop" and second.content == "Second try works."
    stored = app.store.load(app.conversation.id).messages
    assert [m.finish for m in stored] == [None, "error", None, "stop"]


def test_save_writes_the_transcript(tmp_path):
    app = scripted_app(tmp_path, [REPLY])
    out = tmp_path / "out" / "chat.md"
    out.parent.mkdir()

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            await send(pilot, app, "What is the answer?")
            await send(pilot, app, f"/save {out}")
            await send(pilot, app, f"/save {tmp_path / 'missing' / 'x.md'}")  # a bad path is an error, not a crash
            assert any("cannot write" in e for e in errors(app))

    asyncio.run(scenario())
    text = out.read_text()
    assert text == app.conversation.to_markdown()
    assert "## User\n\nWhat is the answer?" in text
    assert "<summary>Thought for 1.0 s</summary>" in text and "line 11: keep 4" in text
    assert text.rstrip().endswith("The answer is **42**.")


def test_resume_restores_the_conversation(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIATTN_DATA_DIR", str(tmp_path / "data"))
    first = scripted_app(tmp_path, [REPLY, "Short reply."], budget=300, system="be brief")
    first.store.close()
    first.store = ChatStore()  # the user data dir, as `triattn chat` uses it

    async def chat_once():
        async with first.run_test(size=(100, 30)) as pilot:
            await send(pilot, first, "one")
            await send(pilot, first, "two")

    asyncio.run(chat_once())
    first.store.close()

    opts = dict(backend="auto", method="triattention", divide_length=32, window=32, sink=4, temperature=0)
    config, store, conversation = prepare(None, True, None, False, None, **opts)  # `triattn chat --resume`
    assert (config.budget, config.system) == (300, "be brief")
    engine = ScriptedEngine(["After resume."])
    from triattn_local.tui.app import ChatApp
    from triattn_local.tui.session import load_stats

    app = ChatApp(config, store, conversation, chat=ChatSession(engine, config, load_stats(engine, config, print)))

    async def resumed():
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause()
            assert [w.text for w in app.query(UserMessage)] == ["one", "two"]
            views = list(app.query(AssistantMessage))
            assert [v.answer for v in views] == ["The answer is **42**.", "Short reply."]
            assert views[0].query_one(Collapsible).collapsed
            assert "Short reply." in screen_text(app)
            assert not app.chat.in_sync
            ids = app.chat.prompt_ids(app.conversation.system, app.conversation.history() + [
                {"role": "user", "content": "three"}])
            assert app.chat.engine.tokenizer.decode(ids).count("<|im_start|>user") == 3  # the whole conversation
            await send(pilot, app, "three")
            assert app.reply_view.answer == "After resume."

    asyncio.run(resumed())
    assert [m.content for m in ChatStore().latest().messages][-2:] == ["three", "After resume."]


def test_system_clear_and_model_commands(tmp_path):
    loaded = []

    def loader(config, notify):
        loaded.append(config.model)
        from triattn_local.tui.session import load_stats

        engine = ScriptedEngine(["From the new model."])
        return ChatSession(engine, config, load_stats(engine, config, notify))

    app = scripted_app(tmp_path, [REPLY], loader=loader)

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            await send(pilot, app, "hello")
            old_id = app.conversation.id
            await send(pilot, app, "/system answer in one word")
            assert app.conversation.system == "answer in one word" and not app.chat.in_sync
            await send(pilot, app, "/model /no/such/dir")
            assert any("no such model directory" in e for e in errors(app))
            await send(pilot, app, "/model demo")
            assert loaded == ["demo"] and app.chat.engine.replies  # the new engine is in use
            await send(pilot, app, "/clear")
            assert not app.query(UserMessage) and app.conversation.id is None
            assert app.store.load(old_id).messages[0].content == "hello"  # the old conversation stays saved
            await send(pilot, app, "/help")
            assert "/budget N" in app.query(Notice).last().source
            await send(pilot, app, "/nope")
            assert any("unknown command /nope" in e for e in errors(app))
            await send(pilot, app, "hi again")
            assert app.reply_view.answer == "From the new model."
            assert app.conversation.system == "answer in one word"

    asyncio.run(scenario())


def test_command_palette_offers_every_slash_command(tmp_path):
    app = scripted_app(tmp_path, [REPLY])

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause()
            titles = [c.title for c in app.get_system_commands(app.screen)]
            for usage in ("/budget N", "/system TEXT", "/clear", "/save FILE", "/model NAME", "/help"):
                assert usage in titles
            await pilot.press("ctrl+p")
            await pilot.press(*"/budget")
            await wait_for(pilot, lambda: "/budget N" in screen_text(app), what="the palette to list /budget")
            await pilot.press("enter")
            await wait_for(pilot, lambda: app.query_one(ChatInput).text == "/budget ", what="the palette's /budget")
            await pilot.press(*"200", "enter")
            await wait_idle(pilot, app)
            assert app.chat.session.compression.policy.budget == 200

    asyncio.run(scenario())


def test_resizing_and_very_long_messages_keep_the_app_usable(tmp_path):
    long_reply = "<think>\n" + "x" * 2000 + "\n</think>\n" + "".join(
        f"## Part {i}\n\n" + "word " * 120 + "\n\n" for i in range(8)) + "The end."
    app = scripted_app(tmp_path, [long_reply, "ok"], max_tokens=20000)
    long_question = "why? " * 3000

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause()
            app.query_one(ChatInput).text = long_question
            await pilot.press("enter")
            await pilot.resize_terminal(50, 16)  # mid-stream
            await pilot.pause()
            assert not app.query_one("#sidebar").display  # too narrow for the KV panel
            await wait_idle(pilot, app)
            assert app.reply_view.answer.endswith("The end.")
            await pilot.resize_terminal(120, 40)
            await pilot.pause()
            assert app.query_one("#sidebar").display and app.size.width >= NARROW
            assert "The end." in screen_text(app)  # still scrolled to the bottom
            await send(pilot, app, "short one")
            assert app.reply_view.answer == "ok"

    asyncio.run(scenario())
    assert app.conversation.messages[1].content == long_reply
    assert app.conversation.messages[0].content == long_question
