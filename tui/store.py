"""Conversations on disk: one SQLite file in the user data dir (TRIATTN_DATA_DIR overrides it), for --resume."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

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


class ChatStore:
    """Conversations and their messages. Used from the UI thread only."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else data_dir() / "chat.sqlite3"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def save_conversation(self, conv: Conversation) -> None:
        """Insert the conversation (giving it an id) or update its title, model, system prompt and settings."""
        now = time.time()
        fields = (conv.title, conv.model, conv.system, json.dumps(conv.settings))
        with self.db:
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
        with self.db:
            self.db.execute(
                "INSERT INTO messages (conversation_id, role, content, thought_seconds, finish, error, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (conv.id, msg.role, msg.content, msg.thought_seconds, msg.finish, msg.error, time.time()))

    def latest(self) -> Conversation | None:
        """The conversation touched last (what --resume reopens)."""
        row = self.db.execute("SELECT id FROM conversations ORDER BY updated DESC, id DESC LIMIT 1").fetchone()
        return self.load(row[0]) if row else None

    def load(self, conversation_id: int) -> Conversation:
        row = self.db.execute("SELECT model, system, settings FROM conversations WHERE id=?",
                              (conversation_id,)).fetchone()
        if row is None:
            raise KeyError(conversation_id)
        messages = [ChatMessage(*r) for r in self.db.execute(
            "SELECT role, content, thought_seconds, finish, error FROM messages WHERE conversation_id=? ORDER BY id",
            (conversation_id,))]
        return Conversation(model=row[0], system=row[1], settings=json.loads(row[2]), messages=messages,
                            id=conversation_id)
