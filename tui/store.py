"""Conversations on disk: one SQLite file in the user data dir (TRIATTN_DATA_DIR overrides it), for --resume."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path

from ..errors import UserError
from .conversation import ChatMessage, Conversation

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    model TEXT NOT NULL,
    system TEXT,
    settings TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    thought_seconds REAL,
    finish TEXT,
    error TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""


def data_dir() -> Path:
    env = os.environ.get("TRIATTN_DATA_DIR")
    if env:
        return Path(env)
    from platformdirs import user_data_dir

    return Path(user_data_dir("triattn", appauthor=False))


class StoreError(UserError):
    """The chat store could not be read or written (locked by another process, corrupt, read-only, disk full).
    One line naming the file, never the conversation's text."""


class ChatStore:
    """Conversations and their messages. Used from the UI thread only.

    The file holds every conversation, so it is created 0600 in a folder created 0700 (existing modes are kept).
    Every failure of SQLite is a StoreError naming the file: the app shows it and keeps the typed message."""

    TIMEOUT = 2.0  # seconds to wait for another process's lock before giving up (the UI waits meanwhile)

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else data_dir() / "chat.sqlite3"
        self.db = None
        try:
            with self._errors("open"):
                _create_private(self.path)
                self.db = sqlite3.connect(self.path, timeout=self.TIMEOUT)
                self.db.execute("PRAGMA foreign_keys = ON")
                self.db.executescript(SCHEMA)
        except StoreError:
            self.close()
            raise

    @contextlib.contextmanager
    def _errors(self, doing: str):
        try:
            yield
        except sqlite3.Error as e:
            raise StoreError(f"cannot {doing} the chat store {self.path}: {_reason(e)}") from None
        except OSError as e:
            raise StoreError(f"cannot {doing} the chat store {self.path}: {e.strerror or e}") from None

    def close(self) -> None:
        if self.db is not None:
            self.db.close()

    def save_conversation(self, conv: Conversation) -> None:
        """Insert the conversation (giving it an id) or update its title, model, system prompt and settings."""
        now = time.time()
        fields = (conv.title, conv.model, conv.system, json.dumps(conv.settings))
        with self._errors("save to"), self.db:
            if conv.id is None:
                cur = self.db.execute(
                    "INSERT INTO conversations (title, model, system, settings, created, updated) "
                    "VALUES (?, ?, ?, ?, ?, ?)", (*fields, now, now))
                conv.id = cur.lastrowid
            else:
                self.db.execute("UPDATE conversations SET title=?, model=?, system=?, settings=?, updated=? "
                                "WHERE id=?", (*fields, now, conv.id))

    def add_message(self, conv: Conversation, msg: ChatMessage) -> None:
        self.save_conversation(conv)
        with self._errors("save to"), self.db:
            self.db.execute(
                "INSERT INTO messages (conversation_id, role, content, thought_seconds, finish, error, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (conv.id, msg.role, msg.content, msg.thought_seconds, msg.finish, msg.error, time.time()))

    def latest(self) -> Conversation | None:
        """The conversation touched last (what --resume reopens)."""
        with self._errors("read"):
            row = self.db.execute("SELECT id FROM conversations ORDER BY updated DESC, id DESC LIMIT 1").fetchone()
        return self.load(row[0]) if row else None

    def load(self, conversation_id: int) -> Conversation:
        with self._errors("read"):
            return self._load(conversation_id)

    def _load(self, conversation_id: int) -> Conversation:
        row = self.db.execute("SELECT model, system, settings FROM conversations WHERE id=?",
                              (conversation_id,)).fetchone()
        if row is None:
            raise KeyError(conversation_id)
        messages = [ChatMessage(*r) for r in self.db.execute(
            "SELECT role, content, thought_seconds, finish, error FROM messages WHERE conversation_id=? ORDER BY id",
            (conversation_id,))]
        return Conversation(model=row[0], system=row[1], settings=json.loads(row[2]), messages=messages,
                            id=conversation_id)


def _create_private(path: Path) -> None:
    """Make the folder (0700) and an empty file (0600) when they do not exist yet; SQLite then opens the file."""
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, mode=0o700)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _reason(e: sqlite3.Error) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "not a database" in text or "malformed" in text:
        return f"{text} (move the file away to start a new one)"
    if "locked" in text or "busy" in text:
        return f"{text} (another triattn chat may be using it)"
    return text
