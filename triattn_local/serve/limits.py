"""What keeps the server in bounds whatever clients send: which Host headers it answers, how much prompt text it
tokenises, and how many requests may wait.

- Host: without --api-key a web page could reach the model through DNS rebinding (its own name resolving to
  127.0.0.1), so only loopback names are served unless --allowed-hosts says more. An IP literal or name the server
  was bound to is allowed too.
- Prompt size: a prompt longer than `context × (bytes of the longest token)` cannot fit whatever its text, so it is
  refused before any tokenising; a shorter one that is still large is counted in chunks, stopping as soon as the
  count passes the context, and only a prompt that fits is tokenised whole. Large texts are counted two at a time.
  Tokenising a 7 MiB prompt whole cost the server over a GiB of memory.
"""

from __future__ import annotations

import asyncio
import ipaddress

from .errors import APIError, error_body

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
CHUNK_CHARS = 1 << 16  # text counted per step; its tokens are a few MiB of memory at most
LARGE_CHARS = 1 << 16  # texts at least this long are counted under the semaphore
CHUNK_SLACK = 3  # tokens a chunk boundary may add (a split word, a BOS per chunk)


# ---- Host header --------------------------------------------------------------------------------------------------


def parse_allowed_hosts(value: str | None, bind_host: str) -> tuple[str, ...] | None:
    """The host names to answer (lowercase, without port); None: any. Default: loopback names and the bound one."""
    if value is not None and value.strip() == "*":
        return None
    hosts = [h.strip().lower() for h in (value or "").split(",") if h.strip()]
    hosts += LOOPBACK_HOSTS
    bound = bind_host.strip().strip("[]").lower()
    if bound and bound not in ("0.0.0.0", "::"):
        hosts.append(bound)
    return tuple(dict.fromkeys(h.strip("[]") for h in hosts))


def host_name(header: str) -> str:
    """`example.com:8000` → `example.com`, `[::1]:8000` → `::1` (lowercase)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    if header.count(":") == 1:
        return header.partition(":")[0]
    return header  # a bare name, or an IPv6 literal without brackets


def is_loopback(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return name == "localhost"


class HostCheck:
    """Answers 403 (OpenAI-shaped) to a request whose Host header is not one of `allowed`."""

    def __init__(self, app, allowed: tuple[str, ...]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"host")
        if header is not None:  # no Host at all (HTTP/1.0 tools) is no browser, so no rebinding
            name = host_name(header.decode("latin-1"))
            if name not in self.allowed:
                from .errors import _send_json

                message = (f"Host '{name}' is not served: without --api-key this server answers only "
                           f"{', '.join(self.allowed)} (start it with --allowed-hosts {name} or an --api-key)")
                return await _send_json(send, 403, error_body(403, message, code="host_not_allowed"))
        return await self.app(scope, receive, send)


# ---- bodies in flight ---------------------------------------------------------------------------------------------

BODY_BUDGET = 32 << 20  # bytes of request bodies read and parsed at once, all requests together


class BodyBudget:
    """Lets request bodies in only while those in flight total at most `budget` bytes (a body without a
    Content-Length counts as the largest allowed); the others wait, unread, in their sockets. Parsing a body costs
    about five copies of it (the bytes, the JSON, the validated request), so this bounds what prompts cost the server
    whatever the number of clients. A body's share is given back when its response starts or the request ends; one
    body alone always gets in."""

    def __init__(self, app, budget: int = BODY_BUDGET, largest: int | None = None):
        from .errors import MAX_BODY_BYTES

        self.app, self.budget, self.largest = app, budget, largest or MAX_BODY_BYTES
        self.used = 0
        self.changed = asyncio.Condition()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            need = min(max(int(length), 0), self.largest) if length is not None else self.largest
        except ValueError:
            need = 0  # BodyLimit answers 400 without reading it
        async with self.changed:
            await self.changed.wait_for(lambda: self.used == 0 or self.used + need <= self.budget)
            self.used += need
        held = True

        async def release():
            nonlocal held
            if held:
                held = False
                async with self.changed:
                    self.used -= need
                    self.changed.notify_all()

        async def releasing_send(message):
            if message["type"] == "http.response.start":
                await release()
            await send(message)

        try:
            await self.app(scope, receive, releasing_send)
        finally:
            await release()


# ---- prompt size --------------------------------------------------------------------------------------------------


def longest_token_bytes(tokenizer) -> int | None:
    """UTF-8 bytes of the longest vocabulary entry (an upper bound on the text one token covers), or None when the
    tokenizer does not list its vocabulary."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - no vocabulary: the byte check is skipped, the chunked count still holds
        return None
    return max((len(str(t).encode("utf-8")) for t in vocab), default=0) or None


def too_long(context: int, what: str, detail: str) -> APIError:
    return APIError(400, f"This model's maximum context length is {context} tokens. However, your {what} "
                         f"{detail}. Please reduce the length of the {what}.",
                    param=what, code="context_length_exceeded")


class PromptLimits:
    """The checks for one loaded engine (the vocabulary is scanned once)."""

    def __init__(self, tokenizer, context: int, concurrent: int = 2):
        self.tokenizer, self.context = tokenizer, context
        self.token_bytes = longest_token_bytes(tokenizer)
        self.max_bytes = context * self.token_bytes if self.token_bytes else None
        self.semaphore = asyncio.Semaphore(concurrent)

    def check_bytes(self, texts: list[str], what: str) -> None:
        """Refuse without tokenising a text that cannot fit in the context whatever it says."""
        if self.max_bytes is None:
            return
        size = sum(len(t) for t in texts)  # characters ≤ bytes: cheap first
        if size <= self.max_bytes:
            return
        size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        if size > self.max_bytes:
            raise too_long(self.context, what, f"has {size} bytes of text, and no token of this model covers more "
                                               f"than {self.token_bytes} bytes")

    def _count_at_least(self, texts: list[str], what: str) -> None:
        """Count tokens chunk by chunk; refuse as soon as the count (less what chunk boundaries may add) passes the
        context. Runs in a worker thread."""
        from .chat_format import encode_text

        count = 0
        for text in texts:
            for start in range(0, len(text), CHUNK_CHARS):
                count += len(encode_text(self.tokenizer, text[start:start + CHUNK_CHARS])) - CHUNK_SLACK
                if count >= self.context:
                    raise too_long(self.context, what, f"hold more than {self.context} tokens")

    async def check(self, texts: list[str], what: str) -> None:
        """Both checks; large texts wait for one of the few counting slots."""
        self.check_bytes(texts, what)
        if sum(len(t) for t in texts) < LARGE_CHARS:
            return
        async with self.semaphore:
            await asyncio.to_thread(self._count_at_least, texts, what)


# ---- the wait line --------------------------------------------------------------------------------------------------


def busy_error(running: int, waiting: int) -> APIError:
    return APIError(429, f"the server is busy ({running} requests generating, {waiting} waiting, the most it "
                         "queues): retry shortly", code="rate_limit_exceeded", type="rate_limit_error")
