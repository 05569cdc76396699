"""Request models of the OpenAI API subset the server implements.

Strict types (no "12" for 12) so that what the OpenAPI schema calls invalid is rejected, and extra fields allowed
and ignored (clients send store, reasoning_effort, parallel_tool_calls, logprobs … that we do not use).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP = 16
MAX_TEXT = 8 * 1024 * 1024  # characters in one string; the body limit (errors.MAX_BODY_BYTES) bounds it anyway

Text = Annotated[str, Field(max_length=MAX_TEXT)]
StopString = Annotated[str, Field(max_length=1000)]


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(_Model):
    """One part of an array content. Only text: other types (image_url, input_audio) get a 400."""

    type: Literal["text", "input_text"]
    text: Text


class FunctionCall(_Model):
    name: str = Field(min_length=1, max_length=256)
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Model):
    id: str | None = Field(default=None, max_length=256)
    type: Literal["function"] | None = "function"
    function: FunctionCall


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], Field(max_length=100000)] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=128)
    tool_call_id: str | None = Field(default=None, max_length=256)
    reasoning_content: Text | None = None
    reasoning: Text | None = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDef(_Model):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Model):
    name: str = Field(min_length=1, max_length=256)


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Model):
    include_usage: bool | None = None


class _Sampling(_Model):
    """Fields shared by chat and text completions."""

    model: str | None = Field(default=None, max_length=1024)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=10000)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = Field(default=None, max_length=512)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: Text | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_TEXT)]
