"""Messages in, prompt token ids out (through the model's chat template); the model's text out, split into
reasoning, content and tool calls (Qwen3 / Hermes syntax: <think>…</think>, <tool_call>{"name", "arguments"}
</tool_call>), as it streams."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from ..engine import partial_suffix_length
from .errors import APIError
from .protocol import ChatCompletionRequest, Message

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
EMPTY_THINK = "<think>\n\n</think>\n\n"  # what Qwen3's template writes when enable_thinking is false
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"

# apply_chat_template's own parameters: a client may not set them through chat_template_kwargs
_RESERVED = {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
             "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
             "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs"}


# ---- input ----------------------------------------------------------------------------------------------------


def parse_arguments(arguments: str | dict) -> dict | str:
    """Tool-call arguments as the templates want them (a dict); a string that is not a JSON object stays a string."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


def active_tools(request: ChatCompletionRequest) -> list[dict] | None:
    """The tools to show the model: none with tool_choice "none", only the named one with a named choice."""
    choice = request.tool_choice
    if not request.tools:
        if choice is not None and choice != "none" and choice != "auto":
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    if choice == "none":
        return None
    tools = [t.model_dump(exclude_none=True) for t in request.tools]
    if choice is not None and not isinstance(choice, str):
        tools = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not tools:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools",
                           param="tool_choice")
    return tools


def template_messages(messages: list[Message], tools: list[dict] | None, template: str) -> list[dict]:
    """OpenAI messages → the dicts Hugging Face chat templates read (developer → system, tool-call arguments as
    dicts). A template that knows nothing of tools gets them written out the way Qwen3's template does."""
    knows_tools = "tools" in template
    knows_calls = "tool_calls" in template
    out = []
    for m in messages:
        d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name:
            d["name"] = m.name
        if m.role == "assistant":
            reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
            if reasoning:
                d["reasoning_content"] = reasoning
            if m.tool_calls:
                calls = [{"type": "function", "id": c.id, "function": {"name": c.function.name,
                          "arguments": parse_arguments(c.function.arguments)}} for c in m.tool_calls]
                if knows_calls:
                    d["tool_calls"] = calls
                else:
                    d["content"] += "".join(f"\n{TOOL_OPEN}\n{_call_json(c)}\n{TOOL_CLOSE}" for c in calls)
        if m.role == "tool":
            d["tool_call_id"] = m.tool_call_id
            if not knows_calls:
                d["content"] = f"<tool_response>\n{d['content']}\n</tool_response>"
        out.append(d)
    if tools and not knows_tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        note = (f"# Tools\n\nYou may call one or more functions. Their signatures:\n<tools>\n{listing}\n</tools>\n\n"
                f"For each call, answer with {TOOL_OPEN}\n{{\"name\": <function-name>, \"arguments\": "
                f"<args-json-object>}}\n{TOOL_CLOSE}")
        if out and out[0]["role"] == "system":
            out[0] = dict(out[0], content=out[0]["content"] + "\n\n" + note)
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


def _call_json(call: dict) -> str:
    f = call["function"]
    return json.dumps({"name": f["name"], "arguments": f["arguments"]}, ensure_ascii=False)


@dataclass
class Prompt:
    ids: list[int]
    text: str
    starts_in_reasoning: bool  # the template opened <think> itself (DeepSeek-R1, Qwen3-Thinking-2507)
    suppress: tuple[int, ...] = ()  # tokens the reply may not contain (<think> when thinking is off)


def render_chat(tokenizer, request: ChatCompletionRequest) -> Prompt:
    """The prompt of a chat request: its messages through the chat template, then token ids.

    chat_template_kwargs go to the template (Qwen3's reads enable_thinking; newer ones preserve_thinking, to keep
    earlier turns' reasoning). enable_thinking: false on a reasoning model (one with a <think> token) gives a reply
    without a <think> block: the prompt ends in an empty one, as Qwen3's template writes it (added here when the
    template does not know the switch), and <think> is never sampled."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise APIError(400, "this model has no chat template: use /v1/completions with a raw prompt")
    tools = active_tools(request)
    kwargs = {}
    for key, value in (request.chat_template_kwargs or {}).items():
        if key in _RESERVED or not key.isidentifier():
            raise APIError(400, f"chat_template_kwargs may not set {key!r}", param="chat_template_kwargs")
        kwargs[key] = value
    messages = template_messages(request.messages, tools, template if isinstance(template, str) else "")
    thinking_off = kwargs.get("enable_thinking") is False and is_reasoning_model(tokenizer)
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False,
                                             **kwargs)
        if thinking_off and not text.rstrip().endswith(THINK_CLOSE):  # the template ignores enable_thinking
            text += EMPTY_THINK[len(THINK_OPEN) + 1:] if text.endswith(THINK_OPEN + "\n") else EMPTY_THINK
        text.encode("utf-8")  # lone surrogates ("\ud800" in the JSON) cannot be tokenized
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    except APIError:
        raise
    except Exception as e:  # the template raised (roles must alternate …) or the text is not valid Unicode
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise APIError(400, f"cannot apply the chat template to these messages: {first}", param="messages") from None
    suppress = (tokenizer.convert_tokens_to_ids(THINK_OPEN),) if thinking_off else ()
    return Prompt(ids, text, text.rstrip().endswith(THINK_OPEN), suppress)


def encode_text(tokenizer, text: str) -> list[int]:
    try:
        text.encode("utf-8")
        return list(tokenizer.encode(text))
    except Exception as e:
        raise APIError(400, f"cannot tokenize the prompt: {str(e).splitlines()[0] if str(e) else e!r}",
                       param="prompt") from None


def is_reasoning_model(tokenizer) -> bool:
    """Whether the model thinks in <think>…</think> (its vocabulary has the tag as one token)."""
    try:
        return THINK_OPEN in tokenizer.get_vocab()
    except Exception:
        return False


# ---- output ---------------------------------------------------------------------------------------------------


@dataclass
class ParsedToolCall:
    index: int
    id: str
    name: str
    arguments: str  # JSON text


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ParsedToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class OutputParser:
    """Splits streamed model text into reasoning, content and tool calls.

    Text that may be the start of a tag is held back until the next delta decides; a tool call is buffered until
    its closing tag and then parsed. Whitespace around sections is trimmed ("<think>\\n…\\n</think>\\n\\n" gives
    reasoning and content without the newlines), and trailing whitespace is held until more text follows."""

    def __init__(self, parse_tools: bool, starts_in_reasoning: bool = False):
        self.parse_tools = parse_tools
        self.mode = "reasoning" if starts_in_reasoning else "content"
        self.pending = ""
        self.tool_buffer = ""
        self.held = {"reasoning": "", "content": ""}
        self.started = {"reasoning": False, "content": False}
        self.tool_calls: list[ParsedToolCall] = []
        self.reasoning_text, self.content_text = [], []
        self.saw_reasoning = starts_in_reasoning

    @property
    def in_reasoning(self) -> bool:
        return self.mode == "reasoning"

    def feed(self, text: str) -> Delta:
        out = Delta()
        self.pending += text
        while self.pending:
            if self.mode == "tool":
                body = self.tool_buffer + self.pending
                j = body.find(TOOL_CLOSE)
                if j < 0:
                    self.tool_buffer, self.pending = body, ""
                    break
                self.pending = body[j + len(TOOL_CLOSE):]
                self._end_tool(body[:j], out, closed=True)
                continue
            if self.mode == "reasoning":
                tags = [THINK_CLOSE, THINK_OPEN]
            else:
                tags = [THINK_OPEN, TOOL_OPEN] if self.parse_tools else [THINK_OPEN]
            hits = [(self.pending.find(t), t) for t in tags]
            hits = [(j, t) for j, t in hits if j >= 0]
            if hits:
                j, tag = min(hits)
                self._emit(self.mode, self.pending[:j], out)
                self.pending = self.pending[j + len(tag):]
                self._switch(tag)
                continue
            keep = partial_suffix_length(self.pending, tags)
            self._emit(self.mode, self.pending[:len(self.pending) - keep], out)
            self.pending = self.pending[len(self.pending) - keep:]
            break
        return out

    def finish(self) -> Delta:
        """Flush at the end of generation: held text, and an unclosed tool call (parsed if it is complete JSON)."""
        out = Delta()
        if self.mode == "tool":
            self._end_tool(self.tool_buffer + self.pending, out, closed=False)
        elif self.pending:
            self._emit(self.mode, self.pending, out)
        self.pending = ""
        return out

    def _switch(self, tag: str) -> None:
        if tag == THINK_OPEN and self.mode == "reasoning":  # a repeated <think> opens nothing new: dropped
            return
        self.held[self.mode] = ""  # whitespace before a tag is dropped
        if tag == THINK_OPEN:
            self.mode, self.saw_reasoning = "reasoning", True
            self.started["reasoning"] = False
        elif tag == THINK_CLOSE:
            self.mode = "content"
            self.started["content"] = False
        elif tag == TOOL_OPEN:
            self.mode, self.tool_buffer = "tool", ""

    def _emit(self, kind: str, text: str, out: Delta) -> None:
        if not text:
            return
        if not self.started[kind]:
            text = text.lstrip()
            if not text:
                return
            self.started[kind] = True
        text = self.held[kind] + text
        body = text.rstrip()
        self.held[kind] = text[len(body):]
        if body:
            if kind == "reasoning":
                out.reasoning += body
                self.reasoning_text.append(body)
            else:
                out.content += body
                self.content_text.append(body)

    def _end_tool(self, body: str, out: Delta, closed: bool) -> None:
        self.mode = "content"
        self.started["content"] = False
        call = _parse_tool_call(body, len(self.tool_calls))
        if call is None:  # not a tool call after all: show it as text
            self._emit("content", TOOL_OPEN + body + (TOOL_CLOSE if closed else ""), out)
            return
        self.tool_calls.append(call)
        out.tool_calls.append(call)

    @property
    def reasoning(self) -> str:
        return "".join(self.reasoning_text)

    @property
    def content(self) -> str:
        return "".join(self.content_text)


def _parse_tool_call(body: str, index: int) -> ParsedToolCall | None:
    try:
        value = json.loads(body.strip())
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ParsedToolCall(index, f"call_{uuid.uuid4().hex[:24]}", value["name"], arguments)
