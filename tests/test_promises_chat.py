"""The chat store (README "What it promises"): private files, and a locked or corrupt database never crashes the app
or loses the typed message: the error is shown in the app, naming the file, and the text stays in the box."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys

import pytest
from test_tui_app import REPLY, errors, send
from test_tui_support import scripted_app

from triattn_local.tui.chat_input import ChatInput
from triattn_local.tui.conversation import ChatMessage, Conversation
from triattn_local.tui.store import ChatStore, StoreError

CLI = [sys.executable, "-m", "triattn_local.cli"]


@pytest.fixture(autouse=True)
def short_lock_wait(monkeypatch):
    monkeypatch.setattr(ChatStore, "TIMEOUT", 0.2)


def lock(path) -> sqlite3.Connection:
    """Another process's exclusive lock on the database (a second connection holds it the same way)."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    return other


def test_a_database_locked_mid_session_keeps_the_message_and_shows_the_path(tmp_path):
    app = scripted_app(tmp_path, [REPLY, REPLY])
    path = tmp_path / "chat.sqlite3"

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            await send(pilot, app, "first")
            other = lock(path)
            await send(pilot, app, "my long message, typed with care")
            (error,) = errors(app)
            assert str(path) in error and "locked" in error and "my long message" not in error
            assert app.query_one(ChatInput).text == "my long message, typed with care"  # kept to send again
            assert [m.content for m in app.conversation.messages if m.role == "user"] == ["first"]
            other.rollback()
            other.close()
            await pilot.press("enter")  # the same text, now that the lock is gone
            await asyncio.sleep(0)
            for _ in range(100):
                if not app.busy:
                    break
                await pilot.pause(0.05)
            assert app.query_one(ChatInput).text == ""

    asyncio.run(scenario())
    stored = ChatStore(path).latest().messages
    assert [m.content for m in stored if m.role == "user"] == ["first", "my long message, typed with care"]


def test_a_reply_the_store_refuses_is_kept_and_saved_with_the_next_message(tmp_path):
    app = scripted_app(tmp_path, [REPLY, REPLY])
    path = tmp_path / "chat.sqlite3"
    real_add = app.store.add_message
    held = []

    def add_while_locked(conv, msg):
        if msg.role == "assistant" and not held:  # another process takes the lock as the reply ends
            held.append(lock(path))
        return real_add(conv, msg)

    app.store.add_message = add_while_locked

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            await send(pilot, app, "first")
            assert len(app.unsaved) == 1 and app.unsaved[0][1].role == "assistant"
            assert app.reply_view.answer == "The answer is **42**."  # shown all the same
            held[0].rollback()
            held[0].close()
            await send(pilot, app, "second")
            assert app.unsaved == []

    asyncio.run(scenario())
    roles = [m.role for m in ChatStore(path).latest().messages]
    assert roles == ["user", "assistant", "user", "assistant"]


def test_corrupt_or_locked_store_at_start_is_one_line_naming_the_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    store = data / "chat.sqlite3"
    store.write_bytes(b"this is not a database" * 100)
    env = dict(os.environ, TRIATTN_DATA_DIR=str(data))
    for args in (["chat", "demo"], ["chat", "--resume"]):
        r = subprocess.run(CLI + args, capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(store) in r.stderr, r.stderr
        assert "not a database" in r.stderr and "Traceback" not in r.stderr
    store.unlink()
    ChatStore(store).add_message(Conversation("demo", None, {}), ChatMessage("user", "hi"))
    other = lock(store)
    try:
        r = subprocess.run(CLI + ["chat", "--resume"], capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(store) in r.stderr, r.stderr
        assert "locked" in r.stderr
    finally:
        other.close()


def test_the_store_is_private_when_new_and_keeps_an_existing_mode(tmp_path):
    path = tmp_path / "new-dir" / "chat.sqlite3"
    ChatStore(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    shared = tmp_path / "shared.sqlite3"
    ChatStore(shared).close()
    shared.chmod(0o640)
    store = ChatStore(shared)
    store.add_message(Conversation("demo", None, {}), ChatMessage("user", "hi"))
    store.close()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o640


def test_store_errors_are_store_errors(tmp_path):
    path = tmp_path / "chat.sqlite3"
    path.write_bytes(b"garbage" * 1000)
    with pytest.raises(StoreError, match="not a database"):
        ChatStore(path)
