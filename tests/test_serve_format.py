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


