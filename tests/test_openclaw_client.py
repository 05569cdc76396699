"""The real client: OpenClaw from npm (node 24 from the npm package `node@24`, both in a private prefix, a private
HOME) drives `triattn serve` with `openclaw infer model run --local` and a 3-turn `openclaw agent --local` session.

The server runs a small random-init Qwen3 with a 32k context and a BPE tokenizer (tests/agent_model.py), scripted
(tests/serve_scripted.py: it says what the last `SAY:` of the prompt tells it), so replies are exact. OpenClaw runs
with its lean settings for small local models (README, "OpenClaw"): agents.defaults.experimental.localModelLean,
skipBootstrap, contextInjection "never", skills.limits.maxSkillsInPrompt 0 — its agent request is then ~12k tokens
(~50k characters: system prompt and tools) instead of ~28k.

Skipped, with the reason, when npm is missing or its registry cannot be reached. About 3 minutes on 2 cores, of which
~1 minute is the npm install; TRIATTN_OPENCLAW_PREFIX=DIR reuses an install (DIR/bin/openclaw, DIR/bin/node)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent_model import make_agent_model
from serve_helpers import CLI, SCRIPTED, start

NPM_TIMEOUT = 600


def _install(prefix: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: cannot install OpenClaw")
    ping = subprocess.run([npm, "ping"], capture_output=True, text=True, timeout=60)
    if ping.returncode != 0:
        pytest.skip(f"the npm registry is unreachable ({(ping.stderr or ping.stdout).strip().splitlines()[-1:]})")
    # node 24 first; then openclaw by npm running on that node (on an older one npm links no bin/openclaw)
    env = dict(os.environ, PATH=f"{prefix / 'bin'}{os.pathsep}{os.environ['PATH']}")
    for package in ("node@24", "openclaw"):
        r = subprocess.run([npm, "install", "-g", "--prefix", str(prefix), "--no-audit", "--no-fund", package],
                           capture_output=True, text=True, timeout=NPM_TIMEOUT, env=env)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            if any(s in " ".join(tail) for s in ("ENOTFOUND", "ETIMEDOUT", "ECONNRESET", "EAI_AGAIN", "network")):
                pytest.skip(f"npm could not download {package}: {tail}")
            raise AssertionError(f"npm install {package} failed: {tail}")
    assert (prefix / "bin" / "openclaw").exists(), "npm installed openclaw without its bin link"


@pytest.fixture(scope="module")
def openclaw(tmp_path_factory):
    """run(*args) → CompletedProcess of the openclaw CLI (node 24 first on PATH, a private HOME)."""
    prefix = Path(os.environ.get("TRIATTN_OPENCLAW_PREFIX") or tmp_path_factory.mktemp("openclaw-npm"))
    if not (prefix / "bin" / "openclaw").exists():
        _install(prefix)
    home = tmp_path_factory.mktemp("openclaw-home")
    env = dict(os.environ, HOME=str(home), PATH=f"{prefix / 'bin'}{os.pathsep}{os.environ['PATH']}", NO_COLOR="1",
               OMP_NUM_THREADS="1")
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, env=env)
    assert node.stdout.startswith("v24."), node.stdout + node.stderr

    def run(*args, timeout=300):
        return subprocess.run(["openclaw", *args], capture_output=True, text=True, env=env, timeout=timeout,
                              cwd=home)

    run.home = home
    return run


@pytest.fixture(scope="module")
def server(tmp_path_factory, openclaw):
    model = make_agent_model(tmp_path_factory.mktemp("agent-model"))
    cache = tmp_path_factory.mktemp("triattn-cache")
    old = os.environ.get("TRIATTN_CACHE")
    os.environ["TRIATTN_CACHE"] = str(cache)  # the stats calibrated for this model stay out of the user's cache
    try:
        s = start(SCRIPTED + [str(model), "--served-model-name", "agent", "--device", "cpu"], tmp_path_factory,
                  "openclaw-client")
    finally:
        os.environ.pop("TRIATTN_CACHE") if old is None else os.environ.__setitem__("TRIATTN_CACHE", old)
    yield s
    s.stop()
    assert "Traceback" not in s.output()


@pytest.fixture(scope="module")
def configured(openclaw, server):
    """OpenClaw's config: the lean settings, then `triattn openclaw --write` merges the provider in."""
    config = openclaw.home / ".openclaw" / "openclaw.json"
    config.parent.mkdir(parents=True)
    lean = {"agents": {"defaults": {"skipBootstrap": True, "contextInjection": "never",
                                    "experimental": {"localModelLean": True}}},
            "skills": {"limits": {"maxSkillsInPrompt": 0}}}
    config.write_text(json.dumps(lean))
    r = subprocess.run(CLI + ["openclaw", "--url", server.base, "--write", "--config", str(config)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    written = json.loads(config.read_text())
    assert written["agents"] == lean["agents"] and "apiKey" not in written["models"]["providers"]["triattn"]
    r = openclaw("config", "validate")
    assert r.returncode == 0, r.stdout + r.stderr
    doctor = openclaw("doctor", "--lint", "--non-interactive")
    assert "apiKey" not in doctor.stdout + doctor.stderr  # no plaintext key to warn about
    return server


def counters(server) -> dict:
    m = server.metrics()
    return {k: m[f"triattn_{k}"] for k in ("prompt_tokens_total", "prompt_tokens_cached_total",
                                           "reasoning_tokens_total", "generation_tokens_total")}


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before}


def infer(openclaw, prompt: str, thinking: str) -> str:
    r = openclaw("infer", "model", "run", "--local", "--model", "triattn/agent", "--thinking", thinking,
                 "--prompt", prompt, "--json")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["ok"] and out["provider"] == "triattn"
    return out["outputs"][0]["text"]


def test_infer_reply_thinking_levels_reach_the_template(openclaw, configured):
    server = configured
    prompts = {}
    for thinking in ("off", "high"):
        before = counters(server)
        assert infer(openclaw, "SAY: Hello from triattn.", thinking) == "Hello from triattn."
        prompts[thinking] = delta(before, counters(server))["prompt_tokens_total"]
    # --thinking off reaches enable_thinking: false, and the template closes an empty <think> block for it
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server.output().split("loading ")[1].split(" (GET")[0])
    empty = len(tokenizer.encode("<think>\n\n</think>\n\n", add_special_tokens=False))
    assert prompts["off"] - prompts["high"] == empty
    before = counters(server)
    text = infer(openclaw, "SAY: <think>\nPlanning the greeting.\n</think>\n\nHello again.", "high")
    assert text == "Hello again."  # the reasoning is not shown as content
    assert delta(before, counters(server))["reasoning_tokens_total"] > 0


def test_agent_session_later_turns_come_from_the_cache(openclaw, configured):
    server = configured
    messages = ["SAY: <think>\nThinking about it.\n</think>\n\nFirst answer.", "SAY: Second answer.",
                "SAY: Third answer."]
    for i, message in enumerate(messages):
        before = counters(server)
        r = openclaw("agent", "--local", "--model", "triattn/agent", "--thinking", "high", "--session-id", "s1",
                     "--message", message, "--json")
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        out = json.loads(r.stdout[r.stdout.index("{"):])
        reply = out["payloads"][0]["text"]
        # the first turn's reply also carries OpenClaw's runtime line (its first user message holds it after SAY:)
        assert reply.startswith(message.split("\n\n")[-1].removeprefix("SAY: ")) and "Thinking" not in reply
        assert out["meta"]["finalAssistantVisibleText"] == reply
        d = delta(before, counters(server))
        usage = out["meta"]["agentMeta"]["usage"]
        assert usage["output"] == d["generation_tokens_total"]  # usage parsed from the final chunk
        assert usage["cacheRead"] == d["prompt_tokens_cached_total"]
        assert usage["input"] + usage["cacheRead"] == d["prompt_tokens_total"]
        if i == 0:
            assert d["reasoning_tokens_total"] > 0
        else:  # the system prompt, tools and earlier turns come from a snapshot
            assert d["prompt_tokens_cached_total"] >= 0.9 * d["prompt_tokens_total"]
