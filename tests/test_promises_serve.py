"""What `triattn serve` promises under attack (README "What it promises"): without a key only loopback Host headers
(no DNS rebinding), an empty key refused, a warning on 0.0.0.0 without one, oversized prompts refused without being
tokenised whole (the memory bound), and a bounded wait line answering 429."""

from __future__ import annotations

import http.client as httpclient
import importlib.util
import json
import subprocess
import tempfile
import time

import pytest
from serve_helpers import CLI, ROOT, assert_openai_error, demo_problem, http, start

MEMORY_BOUND_MIB = 256  # the README's figure for 16 concurrent 7 MiB prompts


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start(CLI + ["serve", "demo", "--parallel", "1", "--max-waiting", "1", "--temperature", "0"],
              tmp_path_factory, "serve-promises")
    yield s
    s.stop()
    assert "Traceback" not in s.output()


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_without_a_key_only_loopback_host_headers_are_served(server):
    port = server.base.rsplit(":", 1)[1]
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example", "localhost.",
                 "0.0.0.0"):
        for method, path, body in (("POST", "/v1/chat/completions", CHAT), ("GET", "/props", None),
                                   ("GET", "/v1/models", None)):
            status, answer = http(method, server.base + path, body, headers={"Host": host})
            error = assert_openai_error(status, answer, 403)
            assert error["code"] == "host_not_allowed" and "--allowed-hosts" in error["message"], error
            assert "model_path" not in json.dumps(answer)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST", "127.0.0.1"):
        status, answer = http("POST", server.base + "/v1/chat/completions", CHAT, headers={"Host": host})
        assert status == 200, (host, answer)
    assert http("GET", server.base + "/props", headers={"Host": f"localhost:{port}"})[0] == 200


def test_allowed_hosts_and_a_key_open_other_names(tmp_path_factory):
    s = start(CLI + ["serve", "demo", "--allowed-hosts", "mybox.lan,10.0.0.5"], tmp_path_factory, "serve-hosts")
    try:
        assert http("GET", s.base + "/v1/models", headers={"Host": "mybox.lan:8000"})[0] == 200
        assert http("GET", s.base + "/v1/models", headers={"Host": "10.0.0.5"})[0] == 200
        assert http("GET", s.base + "/v1/models", headers={"Host": "localhost"})[0] == 200
        assert http("GET", s.base + "/v1/models", headers={"Host": "attacker.example"})[0] == 403
    finally:
        s.stop()
    s = start(CLI + ["serve", "demo", "--api-key", "k"], tmp_path_factory, "serve-hosts-key", api_key="k")
    try:  # with a key a rebinding page cannot get in anyway: any Host, the key decides
        assert http("GET", s.base + "/v1/models", headers={"Host": "mybox.lan"})[0] == 401
        assert http("GET", s.base + "/v1/models", headers={"Host": "mybox.lan", **s.headers()})[0] == 200
    finally:
        s.stop()


def test_an_empty_key_is_an_error_and_0000_without_one_warns(tmp_path):
    for args in (["--api-key", ""], ["--api-key", "  "]):
        r = subprocess.run(CLI + ["serve", "demo", "--port", "0", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--api-key" in r.stderr, r.stderr
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen(CLI + ["serve", "demo", "--host", "0.0.0.0", "--port", "0"], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while "loading" not in log.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        text = log.read_text()
        assert "warning: --host 0.0.0.0 without --api-key" in text and "--api-key KEY" in text, text
    finally:
        proc.terminate()
        proc.wait(15)


def _open_stream(server, content: str, max_tokens: int) -> httpclient.HTTPConnection:
    host, port = server.base.removeprefix("http://").split(":")
    conn = httpclient.HTTPConnection(host, int(port), timeout=120)
    body = json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                       "stream": True})
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    return conn


def test_the_wait_line_is_bounded_with_an_openai_429(server):
    problem = demo_problem(300, seed=3)  # the demo thinks one line per step: a long generation
    streams = [_open_stream(server, problem.prompt, 4000) for _ in range(2)]  # one generating, one waiting
    try:
        responses = [c.getresponse() for c in streams]
        assert [r.status for r in responses] == [200, 200]
        assert responses[0].readline()  # the first is generating
        status, answer = http("POST", server.base + "/v1/chat/completions", CHAT)
        error = assert_openai_error(status, answer, 429)
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded", error
    finally:
        for c in streams:
            c.close()  # cancels both
    deadline = time.time() + 60
    while time.time() < deadline:
        status, _ = http("POST", server.base + "/v1/chat/completions", CHAT)
        if status == 200:
            break
        time.sleep(0.5)
    assert status == 200  # the places are given back


def test_an_oversized_prompt_is_refused_before_tokenising(server):
    for path, body in (("/v1/completions", {"prompt": "lorem ipsum " * 200_000}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "lorem ipsum " * 200_000}]})):
        status, answer = http("POST", server.base + path, body)
        error = assert_openai_error(status, answer, 400)
        assert error["code"] == "context_length_exceeded" and "maximum context length is 8192" in error["message"]


def test_memory_bound_under_16_concurrent_7_mib_prompts():
    """The chunked count (the byte check turned off, as for a model with a large vocabulary and context) keeps the
    server's growth under the README's bound while 16 clients send 7 MiB prompts at once."""
    spec = importlib.util.spec_from_file_location("serve_memory", ROOT / "benchmarks" / "serve_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with tempfile.NamedTemporaryFile("w", suffix=".log") as log:
        proc, base = bench.start_server([], log, count_only=True)
        try:
            row = bench.measure(base, proc.pid, "completions", 16, 7)
        finally:
            proc.terminate()
            proc.wait(15)
    assert row["statuses"] == {"400": 16}, row
    assert row["growth_mib"] < MEMORY_BOUND_MIB, row
