"""The output parser (reasoning, content, tool calls) and the stop-string filter, fed the way a model streams:
the result must not depend on where the text is cut into deltas."""

import json
import random

import pytest

from triattn_local.serve.chat_format import OutputParser


def parse(text, parse_tools=True, starts_in_reasoning=False, cuts=None):
    p = OutputParser(parse_tools, starts_in_reasoning)
    cuts = sorted(cuts or [])
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    streamed = {"reasoning": "", "content": "", "calls": []}
    for delta in [p.feed(x) for x in pieces] + [p.finish()]:
        streamed["reasoning"] += delta.reasoning
        streamed["content"] += delta.content
        streamed["calls"] += [(c.name, json.loads(c.arguments)) for c in delta.tool_calls]
    assert streamed["reasoning"] == p.reasoning and streamed["content"] == p.content
    return streamed


CASES = [
    ("<think>\nLet me see.\n\nTwo lines.\n</think>\n\nThe answer is 4.",
     {"reasoning": "Let me see.\n\nTwo lines.", "content": "The answer is 4.", "calls": []}),
    ("Plain answer, no thinking <at all>.", {"reasoning": "", "content": "Plain answer, no thinking <at all>.", "calls": []}),
    ("<think>\nhmm\n</think>\n\nChecking.\n<tool_call>\n{\"name\": \"ls\", \"arguments\": {\"path\": \"/tmp\"}}\n</tool_call>\n"
     "<tool_call>\n{\"name\": \"cat\", \"arguments\": {\"file\": \"a</b\"}}\n</tool_call>",
     {"reasoning": "hmm", "content": "Checking.", "calls": [("ls", {"path": "/tmp"}), ("cat", {"file": "a</b"})]}),
    ("<tool_call>\nnot json\n</tool_call>", {"reasoning": "", "content": "<tool_call>\nnot json\n</tool_call>", "calls": []}),
    ("<think><think>nested</think>x", {"reasoning": "nested", "content": "x", "calls": []}),
    ("<tool_call>{\"name\": \"f\", \"arguments\": {}}", {"reasoning": "", "content": "", "calls": [("f", {})]}),
]


@pytest.mark.parametrize("text, expected", CASES)
def test_the_split_does_not_depend_on_the_cuts(text, expected):
    assert parse(text) == expected
    assert parse(text, cuts=list(range(1, len(text)))) == expected  # one character a delta
    rng = random.Random(0)
    for _ in range(30):
        assert parse(text, cuts=rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8)))) == expected


def test_without_tools_tool_syntax_is_content_and_a_forced_think_starts_in_reasoning():
    text = "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>"
    assert parse(text, parse_tools=False) == {"reasoning": "", "content": text, "calls": []}
    assert parse("I think.\n</think>\n\nSo: 3.", starts_in_reasoning=True) == \
        {"reasoning": "I think.", "content": "So: 3.", "calls": []}




def test_enable_thinking_false_closes_an_empty_think_block_and_never_samples_think():
    """The demo's template knows no enable_thinking: render_chat writes the empty block Qwen3's template writes, and
    the sampler may not open <think>; a template that opens <think> itself gets it closed."""
    import numpy as np
    from transformers import AutoTokenizer

    from triattn_local.sampling import Sampler, SamplingParams
    from triattn_local.serve.chat_format import EMPTY_THINK, render_chat
    from triattn_local.serve.protocol import ChatCompletionRequest

    tok = AutoTokenizer.from_pretrained("triattn_local/demo/model")
    think = tok.convert_tokens_to_ids("<think>")

    def request(**kwargs):
        return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **kwargs)

    on = render_chat(tok, request())
    off = render_chat(tok, request(chat_template_kwargs={"enable_thinking": False, "preserve_thinking": True}))
    assert off.text == on.text + EMPTY_THINK and off.ids[:len(on.ids)] == on.ids
    assert off.suppress == (think,) and on.suppress == () and not off.starts_in_reasoning
    assert render_chat(tok, request(chat_template_kwargs={"enable_thinking": True})).text == on.text
    tok.chat_template = tok.chat_template + "{% if add_generation_prompt %}<think>\n{% endif %}"  # R1 style
    assert render_chat(tok, request()).starts_in_reasoning
    closed = render_chat(tok, request(chat_template_kwargs={"enable_thinking": False}))
    assert closed.text.endswith("assistant\n" + EMPTY_THINK) and not closed.starts_in_reasoning
    logits = np.zeros(len(tok), dtype=np.float32)
    logits[think], logits[7] = 5.0, 4.0
    assert Sampler(SamplingParams(temperature=0))(logits) == think
    assert Sampler(SamplingParams(temperature=0, suppress=(think,)))(logits) == 7
    assert Sampler(SamplingParams(temperature=1.0, seed=1, suppress=(think,)))(logits) != think
