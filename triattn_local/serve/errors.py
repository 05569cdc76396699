"""Errors in the OpenAI shape, {"error": {"message", "type", "param", "code"}}, for every failure a client can cause.

Validation errors become 400 (FastAPI's default 422 is not what OpenAI clients expect), unknown routes 404, wrong
methods 405, bodies over the limit 413, a missing or wrong key 401, requests while the model loads 503. A 500 means
a bug in the server; it still answers in the same shape, without a traceback.
"""

from __future__ import annotations

import hmac
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

MAX_BODY_BYTES = 8 * 1024 * 1024

log = logging.getLogger("triattn.serve")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}


class APIError(Exception):
    """An error a handler raises to answer with this status and message."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict:
    return {"error": {"message": message, "type": type or TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code, type), status_code=status, headers=headers)


def _describe_validation(errors: list[dict]) -> tuple[str, str | None, str | None]:
    """(message, param, code) for the first pydantic error: where it is and what is wrong, as OpenAI words it."""
    if not errors:
        return "invalid request", None, None
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return f"invalid JSON body: {e.get('ctx', {}).get('error', e.get('msg', ''))}", None, "invalid_json"
    param = ".".join(x for x in loc if _is_field(x)) or None
    if e.get("type") == "missing":
        return f"missing required parameter: '{param or 'body'}'", param, "missing_required_parameter"
    msg = e.get("msg", "invalid value")
    if not param:
        return f"invalid request body: {msg}", None, None
    return f"invalid value for '{param}': {msg}", param, "invalid_value"


def _is_field(part: str) -> bool:
    """Unions add their branch to the error path ("messages.0.content.str", "tool_choice.literal[...]"): keep list
    indices and field names only."""
    return part.isdigit() or (part.isidentifier() and part[0].islower() and part not in _TYPE_NAMES)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "constrained"}


def install(app: FastAPI, api_key: str | None) -> None:
    """Exception handlers, the body-size limit and (with api_key) the Bearer check."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.type)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param, code = _describe_validation(list(exc.errors()))
        return error_response(400, message, param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}", type="server_error")

    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)


class BodyLimit:
    """Reads the whole body first and answers 413 past the limit, so no handler ever sees a huge body; later
    receive() calls go to the client (disconnect detection while streaming). A body somewhat over the limit is
    read to its end before the 413 (a client that sends all before it reads would otherwise see a reset
    connection, not the error); one far over it is refused at once."""

    DRAIN = 8  # read and drop up to this many times the limit

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0:
                return await _send_json(send, 400, error_body(400, "invalid Content-Length header"))
            if declared > self.DRAIN * self.limit:
                return await _send_json(send, 413, _too_large(self.limit))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.DRAIN * self.limit:
                break
            if size <= self.limit:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if size > self.limit:
            return await _send_json(send, 413, _too_large(self.limit))
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class BearerAuth:
    """With --api-key every route but /health needs `Authorization: Bearer KEY` (OpenAI clients send it)."""

    OPEN = ("/health",)

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in self.OPEN:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            body = error_body(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key")
            return await _send_json(send, 401, body, extra=[(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


def _too_large(limit: int) -> dict:
    return error_body(413, f"request body too large (limit {limit // (1024 * 1024)} MiB)", code="request_too_large")


async def _send_json(send, status: int, body: dict, extra: list | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())] + (extra or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
