"""The chat's engine side on a backend other than torch: ChatSession only uses the Engine interface, so a
multi-turn chat (the second turn fed alone after the cached reply) runs unchanged on MLX (CPU here)."""

import pytest

from triattn_local.backends import installed
from triattn_local.tui.config import ChatConfig
from triattn_local.tui.session import load_chat_session
from triattn_local.tui.stream import Chunk, Finished, relay


@pytest.mark.skipif(not installed("mlx"), reason="mlx-lm is not installed")
def test_two_turns_on_mlx():
    config = ChatConfig(backend="mlx", max_tokens=24, temperature=0, budget=48, window=16, divide_length=16)
    chat = load_chat_session(config)
    assert chat.engine.backend == "mlx" and chat.device == "cpu"
    history = [{"role": "user", "content": "001:1+2=3\n000:3+4=7"}]
    first = chat.prompt_ids(None, history)
    messages = list(relay(chat.generate(first), chat.metrics))
    reply = "".join(m.raw for m in messages if isinstance(m, Chunk))
    done = messages[-1]
    assert isinstance(done, Finished) and done.done.generated_tokens == 24 and reply
    assert chat.in_sync
    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "again"}]
    second = chat.prompt_ids(None, history)
    assert len(second) < 40  # only the new turn: the cache already holds the first
    done = [m for m in relay(chat.generate(second), chat.metrics) if isinstance(m, Finished)][0].done
    m = done.metrics
    assert m.logical_tokens == len(first) + 23 + len(second) + 23  # the last sampled token of a reply is not fed
    assert m.rounds > 0 and m.retained_tokens <= 48 + 16 and m == chat.metrics()
