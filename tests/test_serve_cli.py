"""`triattn serve` and `triattn openclaw` bad input: one line on stderr and exit code 2, before any model loads;
and the OpenClaw config merge."""

import json
import socket
import subprocess

import pytest
from serve_helpers import CLI

from triattn_local.errors import UserError
from triattn_local.serve.openclaw import merge


def triattn(*args):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_help_lists_the_commands():
    r = triattn("--help")
    assert r.returncode == 0 and "serve" in r.stdout and "openclaw" in r.stdout
    r = triattn("serve", "--help")
    assert r.returncode == 0 and "--api-key" in r.stdout and "--budget" in r.stdout and "--max-conversations" in r.stdout


@pytest.mark.parametrize("args, words", [
    (["serve", "/no/such/model"], ["/no/such/model", "no such model directory"]),
    (["serve", "--budget", "100", "--window", "128"], ["budget 100"]),
    (["serve", "--pruning-mode", "sideways"], ["pruning mode"]),
    (["serve", "--method", "magic"], ["magic"]),
    (["serve", "--parallel", "0"], ["--parallel"]),
    (["serve", "--port", "70000"], ["--port"]),
    (["serve", "--top-p", "0"], ["--top-p"]),
    (["serve", "--stats", "/no/stats.safetensors"], ["/no/stats.safetensors", "not found"]),
    (["openclaw", "--url", "http://127.0.0.1:9"], ["no triattn server answers"]),
])
def test_bad_input_is_one_line_and_exit_2(args, words):
    assert_one_line_error(triattn(*args), *words)


def test_a_busy_port_is_reported_before_loading():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert_one_line_error(triattn("serve", "--port", port), f"127.0.0.1:{port}")


ENTRY = {"baseUrl": "http://127.0.0.1:8000/v1", "api": "openai-completions", "models": [{"id": "demo"}]}


def test_merge_creates_the_config_and_refuses_json5(tmp_path):
    path = tmp_path / "dir" / "openclaw.json"
    assert merge(path, "triattn", ENTRY) is None  # no old file, no backup
    assert json.loads(path.read_text()) == {"models": {"providers": {"triattn": ENTRY}}}
    path.write_text("{ // a comment\n models: {} }")
    with pytest.raises(UserError, match="not plain JSON"):
        merge(path, "triattn", ENTRY)
    assert path.read_text() == "{ // a comment\n models: {} }"  # untouched
    path.write_text(json.dumps({"models": {"providers": []}}))
    with pytest.raises(UserError, match="providers"):
        merge(path, "triattn", ENTRY)
