"""`triattn chat` driven by the pilot with the real demo model: streaming, Esc, /budget and the KV panel."""

import asyncio
import random

import pytest
from test_tui_support import screen_text, wait_for, wait_idle

from triattn_local.demo.task import make_problem
from triattn_local.engine import TextEvent
from triattn_local.tui.app import ChatApp
from triattn_local.tui.chat_input import ChatInput
from triattn_local.tui.config import ChatConfig
from triattn_local.tui.kv_panel import KVPanel
from triattn_local.tui.messages import Notice
from triattn_local.tui.session import ChatSession, load_stats
from triattn_local.tui.store import ChatStore

PROBLEM = make_problem(random.Random(3), steps=50).prompt  # ~400 prompt tokens


@pytest.fixture(scope="module")
def engine():
    import torch

    from triattn_local.backends import load_engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared 2-core machine: a second intra-op thread only waits
    yield load_engine("demo", device="cpu")
    torch.set_num_threads(threads)


@pytest.fixture
def make_app(engine, tmp_path):
    def make(**config):
        cfg = ChatConfig(**{"temperature": 0, **config})
        chat = ChatSession(engine, cfg, load_stats(engine, cfg, print))
        return ChatApp(cfg, ChatStore(tmp_path / "chat.sqlite3"), chat=chat)

    return make


async def type_and_send(pilot, app, text):
    app.query_one(ChatInput).text = text
    await pilot.press("enter")


def test_send_streams_the_reply_as_it_is_generated(make_app, engine, monkeypatch):
    from triattn_local.tui.messages import AssistantMessage

    app = make_app(max_tokens=150, budget=None)  # long enough to span several 50 ms UI batches on a fast CPU
    views = []  # what the reply view showed after each streamed update
    add = AssistantMessage.add

    async def watched_add(self, thinking, answer):
        await add(self, thinking, answer)
        views.append(self.thinking)

    monkeypatch.setattr(AssistantMessage, "add", watched_add)

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause()
            await type_and_send(pilot, app, PROBLEM)
            assert app.query_one(ChatInput).text == ""
            await wait_idle(pilot, app)

    asyncio.run(scenario())
    reply = app.conversation.messages[-1]
    assert reply.role == "assistant" and reply.finish == "length"
    assert len(views) >= 2, "the reply should appear in pieces while it is generated"
    assert all(app.reply_view.thinking.startswith(v) for v in views)  # each view was a prefix of the reply
    # The screen got exactly what the engine generates for this prompt (greedy, same model).
    session = engine.session()
    direct = "".join(e.text for e in session.generate(engine.encode_prompt(PROBLEM), app.config.sampling())
                     if isinstance(e, TextEvent))
    assert reply.content == direct
    assert app.reply_view.thinking == direct.removeprefix("<think>")


def test_escape_stops_generation_and_the_chat_goes_on(make_app):
    app = make_app(max_tokens=3000, budget=None)

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause()
            await type_and_send(pilot, app, PROBLEM)
            await wait_for(pilot, lambda: len(app.reply_view.thinking) > 20, what="some reasoning")
            await pilot.press("escape")
            await wait_idle(pilot, app)
            assert app.query_one("StatusBar").fields["state"] == "stopped"
            assert "(stopped)" in screen_text(app)
            logical = app.chat.metrics().logical_tokens
            assert app.chat.in_sync  # a stopped reply stays in the cache: the next turn continues from it
            ids = app.chat.prompt_ids(None, [{"role": "user", "content": "again"}])
            assert len(ids) < 40 and logical > 400

    asyncio.run(scenario())
    reply = app.conversation.messages[-1]
    assert reply.finish == "cancelled"
    assert 0 < len(reply.content) < 1500  # far from max_tokens: it stopped


def test_budget_command_changes_the_policy(make_app):
    app = make_app(max_tokens=24, budget=2048, window=32, divide_length=16)

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause()
            assert app.chat.session.compression.policy.budget == 2048
            await type_and_send(pilot, app, "/budget 96")
            await wait_idle(pilot, app)
            assert app.chat.session.compression.policy.budget == 96
            assert app.conversation.settings == {"budget": 96}
            assert app.query_one(KVPanel).rows()["budget"] == "96"
            await type_and_send(pilot, app, "/budget 20")  # not above window + sinks: refused, nothing changes
            await pilot.pause()
            errors = [n for n in app.query(Notice) if n.has_class("error")]
            assert errors and "must be larger than window + sinks" in errors[-1].source
            assert app.chat.session.compression.policy.budget == 96
            await type_and_send(pilot, app, PROBLEM)
            await wait_idle(pilot, app)
            m = app.chat.metrics()
            assert m.budget == 96 and m.rounds > 0 and m.retained_tokens <= 96 + 16
            await type_and_send(pilot, app, "/budget off")
            await wait_idle(pilot, app)
            assert app.chat.session.compression.policy is None
            assert app.query_one(KVPanel).rows()["budget"] == "off"

    asyncio.run(scenario())


def test_kv_panel_shows_the_engines_counters(make_app):
    app = make_app(max_tokens=40, budget=128, window=32, divide_length=32, pruning_mode="per_layer_head")

    async def scenario():
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            await type_and_send(pilot, app, PROBLEM)
            await wait_idle(pilot, app)
            m = app.chat.metrics()  # the engine's own counters
            panel = app.query_one(KVPanel)
            assert panel.metrics == m
            rows = panel.rows()
            assert rows["logical"] == f"{m.logical_tokens:,}"
            assert m.logical_tokens == len(app.chat.engine.encode_prompt(PROBLEM)) + 40 - 1  # the last is not fed
            assert rows["retained"] == f"{m.retained_tokens:,}" and rows["budget"] == "128"
            assert rows["rounds"] == str(m.rounds) and m.rounds > 5
            assert rows["ratio"] == f"{m.logical_tokens / m.retained_tokens:.1f}x"
            screen = screen_text(app)
            for label, value in rows.items():  # and it is what the screen shows
                assert any(label in line and line.rstrip(" │").endswith(value) for line in screen.splitlines())
            heat = app.query_one("RetentionHeatmap")
            assert heat.map.rounds == m.rounds and heat.logical == m.logical_tokens
            shares = heat.map.shares(m.logical_tokens, m.logical_tokens)
            kept = shares[:, :, :heat.map.step].sum(axis=-1)  # one band per position: kept positions per row
            assert (kept + m.logical_tokens - heat.map.step == m.retained_tokens).all()

    asyncio.run(scenario())
