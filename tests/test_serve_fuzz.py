"""Hostile and malformed requests against a real server: schemathesis cases generated from the app's own OpenAPI
schema (invalid ones and valid ones), then hand-written attacks (bad JSON, invalid UTF-8, 10 MB bodies, huge and
negative numbers, unknown roles …). Never a 5xx, never a crash: every refusal is an OpenAI-shaped 4xx, and the
server still answers afterwards."""

import http.client
import json
import urllib.parse

import pytest
from serve_helpers import CLI, assert_openai_error, http as request, start

CAP = 1  # --max-tokens: valid requests stay cheap (a prefill and one sampled token)
SENT: list[tuple[str, int]] = []  # (what, status) of every request sent by this module


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start(CLI + ["serve", "demo", "--max-tokens", str(CAP), "--budget", "256", "--divide-length", "64",
                     "--window", "32", "--parallel", "4"], tmp_path_factory, "serve-fuzz")
    yield s
    s.stop()


def send(server, method: str, path: str, body=None, headers=None):
    status, answer = request(method, server.base + path, body, headers=headers)
    SENT.append((f"{method} {path}", status))
    assert status != 0, f"no answer to {method} {path}: the server crashed?"
    assert status < 500, (status, answer, body if not isinstance(body, bytes) else body[:200])
    if status >= 400:
        assert_openai_error(status, answer)
    return status, answer


@pytest.mark.parametrize("mode", ["negative", "positive"])
def test_schemathesis_cases_from_the_openapi_schema(server, mode):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(server.base + "/openapi.json")
    generation = GenerationMode.NEGATIVE if mode == "negative" else GenerationMode.POSITIVE
    # hypothesis spends most of the time generating these: the mutation test below sends the bulk, cheaply
    examples = {"/v1/chat/completions": 60, "/v1/completions": 30} if mode == "negative" else \
        {"/v1/chat/completions": 15, "/v1/completions": 10, "/health": 1, "/v1/models": 1, "/props": 1, "/metrics": 1}
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path not in examples:
            continue
        if mode == "negative" and operation.method.upper() == "GET":
            continue  # no parameters to break

        @given(case=operation.as_strategy(generation_mode=generation))
        @settings(max_examples=examples[operation.path], deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def check(case):
            response = case.call(base_url=server.base, timeout=120)
            SENT.append((f"{case.method} {case.path} ({mode})", response.status_code))
            assert response.status_code < 500, (response.status_code, response.text[:500], case.body)
            if response.status_code >= 400:
                assert_openai_error(response.status_code, response.json())
            if mode == "negative" and case.method.upper() == "POST":
                assert 400 <= response.status_code < 500, (response.status_code, case.body)

        check()


HOSTILE = [None, True, -1, 0, 10**40, -(10**40), 1e308, -1e308, float("nan"), float("inf"), "", "\x00", "\ud800",
           "x" * 100000, "<|im_end|>", "<think>", "{{ 7*7 }}", "{% for x in range(10**9) %}{% endfor %}", [], {},
           [[[[]]]], {"$ref": "#"}, [None], {"role": "user"}, "user", "function", 1.5, "1", "\u202e"]

SEEDS = {
    "/v1/chat/completions": {
        "model": "demo", "max_completion_tokens": 3, "temperature": 0.5, "top_p": 0.9, "seed": 1, "stop": ["x"],
        "stream": False, "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                     {"role": "assistant", "content": "a", "reasoning_content": "r",
                      "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": "c", "content": "ok"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "auto", "chat_template_kwargs": {"enable_thinking": False},
    },
    "/v1/completions": {"model": "demo", "prompt": "012:3+4=", "max_tokens": 2, "temperature": 0, "stop": "\n",
                        "stream": False, "stream_options": {"include_usage": False}},
}
# without tools the prompt is short (the demo's template has no tool syntax: the server writes a tool listing)
SHORT_CHAT = {k: v for k, v in SEEDS["/v1/chat/completions"].items() if k not in ("tools", "tool_choice")}


def mutate(body, rng):
    """One random hostile change: a value replaced, a key dropped or added, a node wrapped."""
    body = json.loads(json.dumps(body))
    paths = list(_paths(body))
    path = paths[rng.randrange(len(paths))]
    parent, key = _resolve(body, path)
    action = rng.randrange(4)
    if parent is None:
        return rng.choice(HOSTILE)
    if action == 0:
        parent[key] = rng.choice(HOSTILE)
    elif action == 1 and isinstance(parent, dict):
        del parent[key]
    elif action == 2:
        parent[key] = [parent[key]] if rng.random() < 0.5 else {"value": parent[key]}
    else:
        target = parent[key] if isinstance(parent[key], dict) else parent
        if isinstance(target, dict):
            target[rng.choice(["role", "content", "type", "name", "x" * 50, "__proto__", ""])] = rng.choice(HOSTILE)
        else:
            parent[key] = rng.choice(HOSTILE)
    return body


def _paths(node, prefix=()):
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in items:
        yield from _paths(v, prefix + (k,))


def _resolve(body, path):
    if not path:
        return None, None
    node = body
    for k in path[:-1]:
        node = node[k]
    return node, path[-1]


def test_mutated_requests(server):
    """Valid requests with one or two hostile changes each: whatever the change, a 200 or an OpenAI-shaped 4xx."""
    import random

    rng = random.Random(0)
    refused = 0
    for i in range(240):
        path = "/v1/chat/completions" if i % 3 else "/v1/completions"
        seed = SHORT_CHAT if path == "/v1/chat/completions" and i % 4 else SEEDS[path]
        body = mutate(seed, rng)
        if rng.random() < 0.4 and isinstance(body, dict):
            body = mutate(body, rng)
        data = json.dumps(body, allow_nan=True).encode()
        status, answer = send(server, "POST", path, data, {"Content-Type": "application/json"})
        refused += status >= 400
        if status == 200 and isinstance(body, dict) and not body.get("stream"):
            assert answer["usage"]["completion_tokens"] <= CAP
    assert refused >= 100  # most changes break the request


def test_hand_written_hostile_requests(server):
    chat = "/v1/chat/completions"
    ok = {"messages": [{"role": "user", "content": "hi"}]}
    json_h = {"Content-Type": "application/json"}
    bad_bodies = [b"", b"{", b"[]", b"null", b"123", b'"text"', b"{'a': 1}", b'{"messages": [}', b"\x00\x01",
                  b"\xff\xfe\xfd", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
                  b"[" * 100000 + b"]" * 100000, b'{"a": ' * 5000 + b"1" + b"}" * 5000,
                  b'{"messages": [{"role": "user", "content": "\\ud800"}]}', b'{"messages": 1e999}']
    for body in bad_bodies:
        for path in (chat, "/v1/completions"):
            status, _ = send(server, "POST", path, body, json_h)
            assert status == 400
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "nonsense"):
        status, _ = send(server, "POST", chat, json.dumps(ok).encode(), {"Content-Type": content_type})
        assert 400 <= status < 500
    invalid = [
        {}, {"messages": None}, {"messages": "hi"}, {"messages": [{}]}, {"messages": [{"role": "user"}] * 10001},
        {"messages": [{"role": "root", "content": "x"}]}, {"messages": [{"role": None, "content": "x"}]},
        {"messages": [{"role": "user", "content": 5}]}, {"messages": [{"role": "user", "content": [{"text": "x"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
        {"messages": [{"role": "user", "content": [5]}]},
        {**ok, "max_tokens": -1}, {**ok, "max_tokens": 0}, {**ok, "max_tokens": 1.5}, {**ok, "max_tokens": "10"},
        {**ok, "max_tokens": 1e308}, {**ok, "max_completion_tokens": -(10**30)}, {**ok, "temperature": -0.1},
        {**ok, "temperature": 1e9}, {**ok, "temperature": "hot"}, {**ok, "temperature": True}, {**ok, "top_p": 1.01},
        {**ok, "top_p": -1}, {**ok, "n": 0}, {**ok, "n": 2}, {**ok, "seed": "x"}, {**ok, "seed": 1.5},
        {**ok, "stop": 5}, {**ok, "stop": ["a"] * 17}, {**ok, "stop": [None]}, {**ok, "stream": "yes"},
        {**ok, "stream_options": 5}, {**ok, "tools": 5}, {**ok, "tools": [{"type": "function"}]},
        {**ok, "tools": [{"type": "retrieval", "function": {"name": "f"}}]},
        {**ok, "tools": [{"type": "function", "function": {"name": ""}}]},
        {**ok, "tool_choice": "sometimes"}, {**ok, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {**ok, "chat_template_kwargs": 5}, {**ok, "chat_template_kwargs": {"tokenize": True}},
        {**ok, "chat_template_kwargs": {"chat_template": "{{ 7*7 }}"}}, {**ok, "chat_template_kwargs": {"a b": 1}},
        {**ok, "model": 5}, {**ok, "model": "x" * 2000}, {**ok, "model": "../../etc/passwd"},
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": ""}}]}]},
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 5}}]}]},
        {"messages": [{"role": "user", "content": "7" * 9000}]},  # over the 8192-token context
    ]
    for body in invalid:
        send(server, "POST", chat, body)
        assert SENT[-1][1] in (400, 404), body
        send(server, "POST", chat, {"stream": True, **body})
        assert SENT[-1][1] in (400, 404), body
    completions_invalid = [{}, {"prompt": None}, {"prompt": 5}, {"prompt": [-1]}, {"prompt": [10**12]},
                           {"prompt": [[1, 2]]}, {"prompt": ["a", "b"]}, {"prompt": []}, {"prompt": ""},
                           {"prompt": [1.5]}, {"prompt": "x", "max_tokens": -3}, {"prompt": "7" * 9000}]
    for body in completions_invalid:
        status, _ = send(server, "POST", "/v1/completions", body)
        assert status == 400, body
    # valid but extreme: accepted, clamped, answered
    extreme = [{**ok, "max_tokens": 10**40}, {**ok, "max_completion_tokens": 2**63}, {**ok, "seed": -(10**30)},
               {**ok, "stop": ["", "\x00"]}, {**ok, "logit_bias": {"1": 100}, "logprobs": True, "user": "u" * 100},
               {"messages": [{"role": "tool", "content": None}, {"role": "assistant", "content": None}]},
               {"messages": [{"role": "user", "content": "\u202e\u0000\U0001f600 " * 100}]},
               {**ok, "temperature": 2, "top_p": 0}, {**ok, "chat_template_kwargs": {"enable_thinking": {"x": [1]}}}]
    for body in extreme:
        status, answer = send(server, "POST", chat, body)
        assert status == 200, (body, answer)
        assert answer["usage"]["completion_tokens"] <= CAP
    # sizes: 10 MB bodies (declared or chunked), a lying Content-Length
    big = json.dumps({"messages": [{"role": "user", "content": "a" * (10 << 20)}]}).encode()
    for path in (chat, "/v1/completions", "/v1/models"):
        status, _ = send(server, "POST", path, big, json_h)
        assert status in (413, 405)
    assert chunked_post(server, chat, big)[0] == 413
    SENT.append(("chunked 10 MB", 413))
    status, body = raw_post(server, chat, b"{}", {"Content-Length": "99999999999"})
    assert_openai_error(status, json.loads(body), 413)
    # not HTTP at all: the HTTP layer (h11) refuses it before the app sees it, in plain text
    assert raw_post(server, chat, b"{}", {"Content-Length": "-5"})[0] == 400
    SENT.extend([("lying content-length", 413), ("negative content-length", 400)])
    # wrong routes and methods
    for method, path in [("GET", chat), ("PUT", chat), ("DELETE", "/v1/models"), ("GET", "/v1/nope"),
                         ("POST", "/health"), ("GET", "/v1/chat/completions/../../etc/passwd"),
                         ("GET", "/" + "a" * 5000), ("PATCH", "/metrics")]:
        status, _ = send(server, method, urllib.parse.quote(path), b"{}" if method != "GET" else None, json_h)
        assert status in (404, 405)


def test_the_server_survived_and_enough_was_sent(server):
    assert server.proc.poll() is None
    assert server.get("/health") == (200, {"status": "ok"})
    r = server.client().chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].finish_reason in ("stop", "length")
    assert len(SENT) >= 500, len(SENT)
    print(f"\nfuzz: {len(SENT)} requests, {sum(s >= 400 for _, s in SENT)} refused with a 4xx, none 5xx")
    assert all(status < 500 for _, status in SENT)
    refused = [s for _, s in SENT if s >= 400]
    assert len(refused) >= 400
    log = server.output()
    assert "Traceback" not in log and "internal error" not in log


def raw_post(server, path: str, body: bytes, headers: dict):
    """(status, raw body) of a POST with headers as given (a Content-Length that lies)."""
    host = urllib.parse.urlparse(server.base)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
    conn.putrequest("POST", path)
    for k, v in {"Content-Type": "application/json", **headers}.items():
        conn.putheader(k, v)
    conn.endheaders()
    try:
        conn.send(body)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def chunked_post(server, path: str, body: bytes):
    """A POST without Content-Length (chunked transfer): the limit must hold while reading."""
    host = urllib.parse.urlparse(server.base)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
    try:
        conn.request("POST", path, body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        r = conn.getresponse()
        out = r.status, json.loads(r.read())
        assert_openai_error(*out)
        return out
    except (ConnectionResetError, BrokenPipeError):  # the server answered 413 and closed before we finished
        return 413, None
    finally:
        conn.close()
