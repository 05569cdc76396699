"""Snapshots of the chat's main screen at 80x24 and 120x40 after one reply with compression rounds.

Reproducible by construction: a scripted engine (fixed reply, fixed tok/s), a fake clock (fixed time to first token
and reasoning time), a temporary store, no blinking cursor. Update with `pytest tests/test_tui_snapshots.py
--snapshot-update` and look at the SVGs in tests/__snapshots__/ before committing them."""

import pytest
from test_tui_support import FakeClock, scripted_app, wait_idle

from triattn_local.tui.chat_input import ChatInput

REPLY = ("<think>\n" + "".join(f"{i:03d}: carry the {i % 7}, keep the line 24 up\n" for i in range(20)) +
         "</think>\nThe final value is **7**.\n\n- every line checked\n- the cache held the lag\n")


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_main_screen(snap_compare, tmp_path, size):
    app = scripted_app(tmp_path, [REPLY], clock=FakeClock(0.0, 0.21, 0.25, 12.3), pruning_mode="per_layer_head")

    async def run_before(pilot):
        box = app.query_one(ChatInput)
        box.cursor_blink = False
        box.text = "What is the final value of the lagged sum?"
        await pilot.press("enter")
        await wait_idle(pilot, app)

    assert snap_compare(app, terminal_size=size, run_before=run_before)
