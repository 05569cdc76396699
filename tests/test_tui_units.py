"""The chat's pieces without a screen: reasoning split, turn tokens, retention shares, store, transcript, commands,
the batching relay, and the `triattn chat` flags."""

import os
import subprocess
import sys

import numpy as np
import pytest

from triattn_local.compression import RoundRecord
from triattn_local.engine import DoneEvent, KVEvent, KVMetrics, TextEvent, TokenEvent
from triattn_local.errors import UserError
from triattn_local.tui.commands import COMMANDS, help_markdown, parse, parse_budget
from triattn_local.tui.conversation import ChatMessage, Conversation
from triattn_local.tui.heatmap import RetentionMap
from triattn_local.tui.store import ChatStore, data_dir
from triattn_local.tui.stream import Chunk, Finished, FirstToken, KVUpdate, ThinkingEnded, relay
from triattn_local.tui.thinking import ThinkSplitter, split_reply


def feed_all(splitter, deltas):
    parts = [p for d in deltas for p in splitter.feed(d)] + splitter.finish()
    think = "".join(t for k, t in parts if k == "think")
    answer = "".join(t for k, t in parts if k == "answer")
    return think, answer


@pytest.mark.parametrize("cut", range(1, 30))
def test_think_tags_split_anywhere_across_deltas(cut):
    text = "<think>\nadd 3 and 4\n</think>\nIt is **7**."
    assert feed_all(ThinkSplitter(), [text[:cut], text[cut:]]) == ("\nadd 3 and 4\n", "\nIt is **7**.")


def test_reply_without_think_is_all_answer_and_template_opened_think_is_reasoning():
    assert feed_all(ThinkSplitter(), ["<", "b>bold</b>"]) == ("", "<b>bold</b>")
    assert feed_all(ThinkSplitter(thinking=True), ["plan</th", "ink>done"]) == ("plan", "done")
    assert split_reply("plan</think>done") == ("plan", "done", True)  # DeepSeek-R1 style: <think> in the prompt
    assert split_reply("<think>unfinished") == ("unfinished", "", True)


def test_next_turn_tokens_continue_the_cached_conversation_exactly():
    """Feeding only the new turn after a cached reply gives the same tokens as templating the whole chat."""
    from transformers import AutoTokenizer

    from triattn_local.registry import demo_model_dir
    from triattn_local.tui.turns import conversation_ids, next_turn_ids

    tok = AutoTokenizer.from_pretrained(str(demo_model_dir()))
    reply = "<think>\n1+1=2\n</think>\nThe final value is 2."
    first = conversation_ids(tok, "be brief", [{"role": "user", "content": "hi"}])
    full = conversation_ids(tok, "be brief", [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": reply},
                                              {"role": "user", "content": "and now?"}])
    cached = first + tok.encode(reply, add_special_tokens=False)  # the reply's EOS is not in the cache
    assert cached + next_turn_ids(tok, "be brief", "and now?") == full


def test_retention_shares_count_kept_positions_per_band_and_everything_after_the_round():
    m = RetentionMap(num_layers=2, num_kv_heads=2)
    assert (m.shares(12, 3) == 1).all()  # nothing dropped before the first round
    # per_head record: layer None = the same for every layer; head 0 kept 0,1,8,9; head 1 kept 4..7
    m.update(RoundRecord(round=1, step=10, kept=[(None, 0, [0, 1, 8, 9]), (None, 1, [4, 5, 6, 7])]))
    s = m.shares(logical=12, bands=3)  # bands [0,4) [4,8) [8,12); 10 and 11 came after the round
    assert s.shape == (2, 2, 3)
    np.testing.assert_allclose(s[0, 0], [0.5, 0.0, 1.0])
    np.testing.assert_allclose(s[1, 1], [0.0, 1.0, 0.5])
    m.update(RoundRecord(round=2, step=12, kept=[(1, 0, [11])] + [(li, hi, []) for li in range(2) for hi in
                                                                    range(2) if (li, hi) != (1, 0)]))
    np.testing.assert_allclose(m.shares(12, 3)[1, 0], [0, 0, 0.25])  # per_layer_head: layer 1 head 0 only


def test_store_round_trip_and_latest(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIATTN_DATA_DIR", str(tmp_path / "data"))
    assert data_dir() == tmp_path / "data"
    store = ChatStore()
    assert store.path == tmp_path / "data" / "chat.sqlite3"
    old = Conversation("demo", settings={"budget": 512})
    store.add_message(old, ChatMessage("user", "first"))
    conv = Conversation("demo", "be brief", {"budget": None})
    sent = [ChatMessage("user", "hello\nthere"), ChatMessage("assistant", "<think>x</think>hi", 1.5, "stop")]
    for message in sent:
        conv.messages.append(message)
        store.add_message(conv, message)
    store.close()
    again = ChatStore()
    latest = again.latest()
    assert latest.id == conv.id and latest.title == "hello"
    assert latest.system == "be brief" and latest.settings == {"budget": None}
    assert latest.messages == sent
    assert again.load(old.id).settings == {"budget": 512}


def test_transcript_markdown_folds_reasoning():
    conv = Conversation("demo", "be brief", messages=[
        ChatMessage("user", "What is 3+4?"),
        ChatMessage("assistant", "<think>\n3+4=7\n</think>\nIt is **7**.", 12.4, "stop"),
        ChatMessage("user", "again"),
        ChatMessage("assistant", "It is", None, "error", "backend exploded"),
    ])
    md = conv.to_markdown()
    assert md.startswith("# What is 3+4?\n")
    assert "## System\n\nbe brief" in md
    assert "<details>\n<summary>Thought for 12 s</summary>\n\n3+4=7\n\n</details>\n\nIt is **7**." in md
    assert "> error: backend exploded" in md
    assert md.count("## User") == 2 and md.count("## Assistant") == 2


def test_slash_commands_parse_and_reject():
    assert parse("/budget 512")[1] == "512"
    assert parse("  /SAVE  out.md ")[1] == "out.md"
    assert parse("/system")[1] == ""  # clears the system prompt
    with pytest.raises(UserError, match="unknown command /nope"):
        parse("/nope")
    with pytest.raises(UserError, match="usage: /budget N"):
        parse("/budget")
    assert parse_budget("256") == 256 and parse_budget("off") is None
    with pytest.raises(UserError):
        parse_budget("lots")
    assert all(c.usage in help_markdown() for c in COMMANDS)


def metrics(logical):
    return KVMetrics(logical, logical, logical, None, 0, 0, 0)


def test_relay_batches_text_and_times_with_the_given_clock():
    ticks = iter(range(100))
    now = [0.0]
    events = [KVEvent(metrics(5)), TokenEvent(1), TextEvent("<thi"), TokenEvent(2), TextEvent("nk>ab"),
              TokenEvent(3), TextEvent("c</think>"), TokenEvent(4), TextEvent("An"), TokenEvent(5), TextEvent("swer"),
              DoneEvent("stop", 5, 5, 0.1, 0.5, metrics(10))]
    out = list(relay(events, clock=lambda: float(next(ticks)), timer=lambda: now[0], interval=1.0))
    kinds = [type(m) for m in out]
    assert kinds == [KVUpdate, FirstToken, Chunk, ThinkingEnded, Chunk, Finished]
    assert out[1].seconds == 1.0  # clock: 0 at the start, 1 at the first token
    assert (out[2].thinking, out[2].answer, out[2].raw) == ("abc", "", "<think>abc</think>")
    assert out[3].seconds == 1.0  # reasoning from clock 2 to clock 3
    assert (out[4].answer, out[4].raw) == ("Answer", "Answer")


def test_relay_sends_the_text_it_has_before_an_error():
    def events():
        yield TokenEvent(1)
        yield TextEvent("partial")
        raise RuntimeError("boom")

    got = []
    with pytest.raises(RuntimeError, match="boom"):
        for m in relay(events(), timer=lambda: 0.0, interval=10.0):
            got.append(m)
    assert isinstance(got[-1], Chunk) and got[-1].answer == "partial"


CLI = [sys.executable, "-m", "triattn_local.cli"]


def test_cli_chat_bad_input_is_one_line_and_exit_2(tmp_path):
    env = dict(os.environ, TRIATTN_DATA_DIR=str(tmp_path))
    for args, words in ((["chat", str(tmp_path / "missing")], "no such model directory"),
                        (["chat", "--resume"], "no conversation to resume"),
                        (["chat", "--budget", "8"], "must be larger than window + sinks")):
        r = subprocess.run(CLI + args, capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2, r.stderr
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr
    r = subprocess.run(CLI + ["chat", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "--resume" in r.stdout


def test_resume_takes_model_budget_and_system_from_the_stored_conversation(tmp_path):
    from triattn_local.tui.main import prepare

    path = tmp_path / "chat.sqlite3"
    store = ChatStore(path)
    conv = Conversation("demo", "be brief", {"budget": 300})
    store.add_message(conv, ChatMessage("user", "hi"))
    store.close()
    opts = dict(backend="auto", method="triattention", divide_length=32, window=32, sink=4)
    config, store, resumed = prepare(None, True, None, False, None, store_factory=lambda: ChatStore(path), **opts)
    assert (config.model, config.budget, config.system) == ("demo", 300, "be brief")
    assert [m.content for m in resumed.messages] == ["hi"]
    store.close()
    config, store, _ = prepare(None, True, None, False, 200, store_factory=lambda: ChatStore(path), **opts)
    assert config.budget == 200  # a flag given now wins
    store.close()
    config, store, resumed = prepare(None, False, None, True, None, store_factory=lambda: ChatStore(path), **opts)
    assert config.budget is None and resumed is None
    store.close()
