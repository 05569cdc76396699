"""OpenAI response bodies: whole chat and text completions, their streamed chunks as server-sent events, usage."""

from __future__ import annotations

import asyncio
import json

from fastapi import Request

from . import errors
from .chat_format import OutputParser
from .errors import APIError
from .generation import Run, Summary


def usage(summary: Summary) -> dict:
    kv = summary.kv
    return {
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.completion_tokens,
        "total_tokens": summary.prompt_tokens + summary.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": summary.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": summary.reasoning_tokens},
        "kv": {"budget": kv.budget, "retained_tokens": kv.retained_tokens, "logical_tokens": kv.logical_tokens,
               "peak_retained_tokens": kv.peak_retained_tokens, "compression_rounds": kv.rounds,
               "kv_bytes": kv.kv_bytes, "kv_bytes_full": kv.kv_bytes_full},
    }


def chat_response(meta: dict, deltas: list, summary: Summary, parser: OutputParser) -> dict:
    content = parser.content
    message = {"role": "assistant", "content": content if content or not parser.tool_calls else None,
               "reasoning_content": parser.reasoning or None}
    if parser.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in parser.tool_calls]
    return {**meta, "object": "chat.completion", "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": summary.finish_reason}],
            "usage": usage(summary)}


def completion_response(meta: dict, texts: list, summary: Summary) -> dict:
    return {**meta, "object": "text_completion", "system_fingerprint": None,
            "choices": [{"index": 0, "text": "".join(texts), "logprobs": None,
                         "finish_reason": summary.finish_reason}],
            "usage": usage(summary)}


async def stream_chat(run: Run, meta: dict, include_usage: bool):
    def chunk(delta: dict, finish: str | None = None) -> dict:
        body = {**meta, "object": "chat.completion.chunk", "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return body

    yield chunk({"role": "assistant", "content": ""})
    async for item in run.events():
        if isinstance(item, Summary):
            yield chunk({}, item.finish_reason)
            if include_usage:
                yield {**meta, "object": "chat.completion.chunk", "system_fingerprint": None, "choices": [],
                       "usage": usage(item)}
            return
        if item.reasoning:
            yield chunk({"reasoning_content": item.reasoning})
        if item.content:
            yield chunk({"content": item.content})
        for call in item.tool_calls:
            yield chunk({"tool_calls": [{"index": call.index, "id": call.id, "type": "function",
                                         "function": {"name": call.name, "arguments": ""}}]})
            yield chunk({"tool_calls": [{"index": call.index, "function": {"arguments": call.arguments}}]})


async def stream_completion(run: Run, meta: dict, include_usage: bool):
    def chunk(text: str, finish: str | None = None) -> dict:
        body = {**meta, "object": "text_completion", "system_fingerprint": None,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return body

    async for item in run.events():
        if isinstance(item, Summary):
            yield chunk("", item.finish_reason)
            if include_usage:
                yield {**meta, "object": "text_completion", "system_fingerprint": None, "choices": [],
                       "usage": usage(item)}
            return
        yield chunk(item)


def sse(chunks):
    """Server-sent events: one `data:` line per chunk, then `data: [DONE]`. An error after the stream started is
    sent as an error event (the status line is already out)."""
    from sse_starlette import EventSourceResponse

    async def events():
        try:
            async for body in chunks:
                yield {"data": json.dumps(body, ensure_ascii=False)}
        except APIError as e:
            yield {"data": json.dumps(errors.error_body(e.status, e.message, e.param, e.code, e.type))}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), ping=15)


async def whole(request: Request, run: Run, build) -> dict:
    """A non-streamed response; the generation is cancelled if the client disconnects meanwhile."""
    items: list = []
    summary: Summary | None = None

    async def collect():
        nonlocal summary
        async for item in run.events():
            if isinstance(item, Summary):
                summary = item
            else:
                items.append(item)

    task = asyncio.ensure_future(collect())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                raise APIError(400, "the client disconnected", code="client_disconnected")
        task.result()  # raises what the generation raised
        return build(items, summary)
    finally:
        if not task.done():
            task.cancel()  # cancels the job (Run.events' finally)
