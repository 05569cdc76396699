"""A scripted engine for server tests: the demo model runs for real (prefill, KV cache, compression rounds), but its
logits are replaced so that it says what the conversation tells it to.

The reply is the text after the last `SAY:` in the prompt, up to the end of that message; then the end-of-turn
token. Without a `SAY:`, the model's own logits stand. So a test scripts reasoning (`<think>…</think>`), tool calls
(`<tool_call>{…}</tool_call>`) and answers, and the tool's result can carry the next `SAY:`.

The tokenizer gets a chat template written here after Qwen3's behaviour: tools listed in the system turn, tool
calls and results in Hermes tags, consecutive tool results in one user turn, and the reasoning of assistant turns
before the last user query dropped (which is what makes conversation reuse non-trivial).

Run as a script, it serves that engine: `python tests/serve_scripted.py [triattn serve options]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN3_LIKE_TEMPLATE = r"""
{%- set ns = namespace(last_query=messages|length - 1, multi_step=true) -%}
{%- for m in messages[::-1] -%}
  {%- set i = messages|length - 1 - loop.index0 -%}
  {%- if ns.multi_step and m.role == 'user' and not (m.content.startswith('<tool_response>')) -%}
    {%- set ns.multi_step = false -%}{%- set ns.last_query = i -%}
  {%- endif -%}
{%- endfor -%}
{%- if tools -%}
<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools
<tools>
{% for t in tools %}{{ t | tojson }}
{% endfor %}</tools>
Call a tool with <tool_call>
{"name": <name>, "arguments": <json>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' -%}
<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif -%}
{%- for m in messages -%}
  {%- if m.role == 'user' or (m.role == 'system' and not loop.first) -%}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% elif m.role == 'assistant' -%}
    {%- set content = m.content or '' -%}
    {%- set reasoning = m.reasoning_content or '' -%}
    {%- if not reasoning and '</think>' in content -%}
      {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') -%}
      {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
    {%- endif -%}
    {%- if loop.index0 > ns.last_query -%}
<|im_start|>assistant
<think>
{{ reasoning.strip('\n') }}
</think>

{{ content.lstrip('\n') }}
    {%- else -%}
<|im_start|>assistant
{{ content }}
    {%- endif -%}
    {%- for call in m.tool_calls or [] -%}
      {%- set f = call.function if call.function else call -%}
      {%- if loop.first and content %}{{ '\n' }}{% endif -%}
<tool_call>
{"name": "{{ f.name }}", "arguments": {{ f.arguments if f.arguments is string else f.arguments | tojson }}}
</tool_call>
    {%- endfor -%}
<|im_end|>
{% elif m.role == 'tool' -%}
    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{% endif -%}
    {{ '\n<tool_response>\n' + m.content + '\n</tool_response>' }}
    {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\n' }}{% endif -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif -%}
{%- endif -%}
"""


class ScriptedRunner:
    """A SequenceRunner around a real one: the forward runs, then the logits are overridden by the script."""

    def __init__(self, inner, tokenizer, eos_id: int):
        self.inner = inner
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self.no_think = tokenizer.encode("<think>\n\n</think>\n\n", add_special_tokens=False)  # enable_thinking=False
        self.fed: list[int] = []

    def forward(self, token_ids, start_position):
        logits = self.inner.forward(token_ids, start_position)
        self.fed.extend(int(t) for t in token_ids)
        script = self._script()
        if script is None:
            return logits
        done, target = script
        nxt = target[done] if done < len(target) else self.eos_id
        out = np.full_like(logits, -1e4)
        out[nxt] = 0.0
        return out

    def _script(self):
        """(tokens of the reply generated so far, the reply's tokens + end of turn), or None without a SAY:."""
        h = len(self.header)
        start = None
        for i in range(len(self.fed) - h, -1, -1):
            if self.fed[i:i + h] == self.header:
                start = i + h
                break
        if start is None:
            return None
        if self.fed[start:start + len(self.no_think)] == self.no_think:
            start += len(self.no_think)
        before = self.tokenizer.decode(self.fed[:start], skip_special_tokens=False)
        k = before.rfind("SAY:")
        if k < 0:
            return None
        said = before[k + 4:].split("<|im_end|>")[0].lstrip(" ")
        said = said.split("\n</tool_response>")[0]
        target = self.tokenizer.encode(said, add_special_tokens=False) + [self.eos_id]
        return len(self.fed) - start, target

    def head_scores(self, scorer, round_start):
        return self.inner.head_scores(scorer, round_start)

    def compact(self, keep):
        self.inner.compact(keep)

    def reset(self):
        self.fed = []
        self.inner.reset()

    def save(self):
        inner = self.inner.save()
        return None if inner is None else (inner, list(self.fed))

    def load(self, saved):
        inner, fed = saved
        self.inner.load(inner)
        self.fed = list(fed)


def scripted_engine(model: str = "demo"):
    """The demo engine (or another), its sequence runners scripted and its chat template Qwen3-like."""
    from triattn_local.backends import load_engine

    engine = load_engine(model, backend="torch", device="cpu")
    engine.tokenizer.chat_template = QWEN3_LIKE_TEMPLATE
    eos_id = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    make = engine.new_sequence_runner

    def new_sequence_runner(*args, **kwargs):
        return ScriptedRunner(make(*args, **kwargs), engine.tokenizer, eos_id)

    engine.new_sequence_runner = new_sequence_runner
    return engine


def main() -> None:
    """`triattn serve` with the scripted engine (same options)."""
    from triattn_local.cli import main as cli_main
    from triattn_local.serve import server

    original = server.serve_command
    server.serve_command = lambda **o: original(**o, engine_factory=lambda: scripted_engine(o["model"]))
    sys.argv = ["triattn", "serve"] + sys.argv[1:]
    cli_main()


if __name__ == "__main__":
    main()
