"""What an agent (OpenClaw) does with the server: tools, reasoning, multi-turn sessions, an API key, cancelling,
and `triattn openclaw`. The server runs the demo model with scripted logits (tests/serve_scripted.py: it says what
the conversation's last `SAY:` tells it) and a Qwen3-like chat template, so tool calls are exact."""

import json
import subprocess
import threading
import time

import openai
import pytest
from serve_helpers import CLI, SCRIPTED, assert_openai_error, http, start

KEY = "sk-test-key"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.", "strict": False,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = ('SAY: <think>\nI should look it up.\n</think>\n\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>')


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start(SCRIPTED + ["demo", "--api-key", KEY, "--budget", "512", "--divide-length", "32", "--window", "64",
                          "--parallel", "2"], tmp_path_factory, "serve-agent", api_key=KEY)
    yield s
    s.stop()
    assert "Traceback" not in s.output()


def test_api_key_is_required_except_for_health(server):
    assert http("GET", server.base + "/health") == (200, {"status": "ok"})
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        status, body = http("GET", server.base + "/v1/models", headers=headers)
        assert assert_openai_error(status, body, 401)["code"] == "invalid_api_key"
    status, body = http("POST", server.base + "/v1/chat/completions", {"messages": []})
    assert_openai_error(status, body, 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="nope", max_retries=0).models.list()
    assert [m.id for m in server.client().models.list().data] == ["demo"]


def test_tool_round_trip_with_reused_cache(server):
    client = server.client()
    messages = [{"role": "developer", "content": "You are a weather bot."},
                {"role": "user", "content": [{"type": "text", "text": "Weather in Paris? "}, {"type": "text", "text": CALL}]}]
    # what OpenClaw sends besides: fields the server does not use are accepted and ignored
    extra = dict(store=False, reasoning_effort="low", parallel_tool_calls=False, metadata={"a": "b"},
                 extra_body={"unknown_field": [1, 2]})
    first = client.chat.completions.create(model="demo", messages=messages, tools=TOOLS, tool_choice="auto", **extra)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.reasoning_content == "I should look it up."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}

    messages.append({"role": "assistant", "content": None, "reasoning_content": choice.message.reasoning_content,
                     "tool_calls": [call.model_dump()]})
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C. SAY: It is sunny in Paris."})
    second = client.chat.completions.create(model="demo", messages=messages, tools=TOOLS, max_completion_tokens=100)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "It is sunny in Paris."
    assert not second.choices[0].message.tool_calls
    # the first prompt up to its last message boundary (before \n<|im_start|>assistant\n) came from its snapshot
    header = len("\n_assistant\n")
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - header
    # the next user turn: the template now drops the first turn's reasoning, so the second request's snapshots (after
    # the tool call, after the tool result) are no prefix of it: it starts from the first request's again
    messages.append({"role": "assistant", "content": [{"type": "text", "text": "It is sunny in Paris."}]})
    messages.append({"role": "user", "content": "Thanks! SAY: You are welcome."})
    third = client.chat.completions.create(model="demo", messages=messages, tools=TOOLS)
    assert third.choices[0].message.content == "You are welcome."
    assert third.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - header


def test_streamed_tool_call_deltas(server):
    client = server.client()
    chunks = list(client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Weather? " + CALL}], tools=TOOLS, stream=True,
        stream_options={"include_usage": True}))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].index == 0 and calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris", "days": 2}
    assert all(tc.index == 0 for tc in calls)
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)  # no tool-call text in content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    usage = chunks[-1].usage
    assert usage.completion_tokens_details.reasoning_tokens == len("\nI should look it up.\n") + 1  # + </think>


def test_tool_choice_none_keeps_the_text(server):
    r = server.client().chat.completions.create(model="demo", messages=[{"role": "user", "content": "x " + CALL}],
                                                tools=TOOLS, tool_choice="none")
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content.startswith("<tool_call>")


def test_enable_thinking_false_and_reasoning_split(server):
    client = server.client()
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "SAY: Hello there."}],
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content == "Hello there." and r.choices[0].message.reasoning_content is None
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    r = client.chat.completions.create(model="demo", messages=[
        {"role": "system", "content": "Think first."},
        {"role": "user", "content": "SAY: <think>\nHmm, two lines\nof thought.\n</think>\n\nDone."}])
    assert r.choices[0].message.reasoning_content == "Hmm, two lines\nof thought."
    assert r.choices[0].message.content == "Done."


def test_stop_strings_and_length(server):
    client = server.client()
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "SAY: alpha beta gamma"}],
                                       stop=["gam", "zzz"])
    assert r.choices[0].message.content == "alpha beta" and r.choices[0].finish_reason == "stop"
    messages = [{"role": "user", "content": "SAY: alpha beta gamma"}]
    first = r = client.chat.completions.create(model="demo", messages=messages, max_tokens=4)
    assert r.choices[0].message.content == "alph" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4
    # the next turn after a reply cut short starts from the snapshot after the user message
    messages += [{"role": "assistant", "content": "alph"}, {"role": "user", "content": "SAY: more"}]
    r = client.chat.completions.create(model="demo", messages=messages)
    assert r.choices[0].message.content == "more"
    assert r.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - len("\n_assistant\n")


def test_a_repeated_request_is_not_served_from_its_own_answer(server):
    client = server.client()
    messages = [{"role": "user", "content": "SAY: same again"}]
    cached = []
    for _ in range(2):
        r = client.chat.completions.create(model="demo", messages=messages)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        assert r.choices[0].message.content == "same again"
    assert cached == [0, r.usage.prompt_tokens - len("\n_assistant\n")]  # its prompt's snapshot, not its answer


def test_a_short_request_is_served_while_a_long_one_streams(server):
    """Requests take turns step by step: a short one sent while a long one streams does not wait for it."""
    long_text = "SAY: " + "x" * 250
    done = {}

    def long_request(name):
        client = server.client()
        for _ in client.chat.completions.create(model="demo", messages=[{"role": "user", "content": long_text}],
                                                stream=True):
            pass
        done[name] = time.time()

    t = threading.Thread(target=long_request, args=("long",))
    t.start()
    time.sleep(0.3)
    r = server.client().chat.completions.create(model="demo", messages=[{"role": "user", "content": "SAY: ok"}])
    done["short"] = time.time()
    t.join()
    assert r.choices[0].message.content == "ok"
    assert done["short"] < done["long"]


def test_client_disconnect_cancels_generation_and_frees_its_kv(server):
    import httpx

    before = server.metrics()
    body = {"model": "demo", "messages": [{"role": "user", "content": "SAY: " + "y" * 2000}], "stream": True}
    with httpx.Client(timeout=60, headers=server.headers()) as h:
        with h.stream("POST", server.url + "/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(8)]
            assert any(line.startswith("data: ") for line in got)
        # leaving the block closes the connection mid-stream
    m = wait_for(server, lambda m: m["triattn_requests_cancelled_total"] > before["triattn_requests_cancelled_total"]
                 and m["triattn_requests_running"] == 0)
    assert m["triattn_generation_tokens_total"] == before["triattn_generation_tokens_total"]  # never finished
    # a client of a whole (non-streamed) answer that gives up is noticed too
    with httpx.Client(timeout=1.0, headers=server.headers()) as h:
        with pytest.raises(httpx.TimeoutException):
            h.post(server.url + "/chat/completions", json={**body, "stream": False})
    wait_for(server, lambda m: m["triattn_requests_cancelled_total"] >= before["triattn_requests_cancelled_total"] + 2
             and m["triattn_requests_running"] == 0)
    assert server.client().chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "SAY: still here"}]).choices[0].message.content == "still here"


def wait_for(server, condition, timeout: float = 30) -> dict:
    """The server's metrics once condition(metrics) holds (the worker notices a cancel at its next step)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = server.metrics()
        if condition(m):
            return m
        time.sleep(0.2)
    pytest.fail(f"not cancelled: {m}")


def test_openclaw_prints_and_merges_the_provider_entry(server, tmp_path):
    run = lambda *a: subprocess.run(CLI + ["openclaw", "--url", server.base, "--api-key", KEY, *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    r = run()
    assert r.returncode == 0, r.stderr
    provider = json.loads(r.stdout)["models"]["providers"]["triattn"]
    assert provider["baseUrl"] == server.url and provider["api"] == "openai-completions"
    assert provider["apiKey"] == KEY
    (model,) = provider["models"]
    assert model["id"] == "demo" and model["contextWindow"] == 8192 and model["reasoning"] is True
    assert 0 < model["maxTokens"] <= 8192 and model["input"] == ["text"]
    assert model["compat"] == {"thinkingFormat": "qwen-chat-template"}  # OpenClaw's thinking levels reach the template

    config = tmp_path / "openclaw.json"
    old = {"agents": {"defaults": {"model": {"primary": "x/y"}}},
           "models": {"providers": {"other": {"baseUrl": "http://other/v1"}}}}
    config.write_text(json.dumps(old))
    r = run("--write", "--config", str(config), "--provider", "local")
    assert r.returncode == 0, r.stderr
    merged = json.loads(config.read_text())
    assert merged["agents"] == old["agents"] and merged["models"]["providers"]["other"] == old["models"]["providers"]["other"]
    assert merged["models"]["providers"]["local"] == provider
    (backup,) = tmp_path.glob("openclaw.json.bak-*")
    assert json.loads(backup.read_text()) == old

    r = subprocess.run(CLI + ["openclaw", "--url", server.base], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "API key" in r.stderr


def test_openclaw_finds_the_server_a_running_serve_records(server, tmp_path, monkeypatch):
    from triattn_local.serve import openclaw, running

    record = json.loads((running.servers_dir() / f"{server.pid}.json").read_text())
    assert record["url"] == server.url and record["api_key"] is True and "key" not in json.dumps(record).replace("api_key", "")
    # nothing on the default port: the recorded server is found; a record of a dead process is removed
    monkeypatch.setattr(openclaw, "DEFAULT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("TRIATTN_CACHE", str(tmp_path))
    running.servers_dir().mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (running.servers_dir() / "stale.json").write_text(json.dumps(dict(record, pid=dead.pid, url="http://127.0.0.1:1/v1")))
    (running.servers_dir() / "live.json").write_text(json.dumps(record))
    assert openclaw.find_server(None, KEY) == server.base
    assert not (running.servers_dir() / "stale.json").exists()
    assert openclaw.find_server("http://elsewhere:1234", KEY) == "http://elsewhere:1234"
    for path in running.servers_dir().iterdir():
        path.unlink()
    with pytest.raises(openclaw.UserError, match="--url"):
        openclaw.find_server(None, KEY)


def test_openclaw_entry_has_no_key_for_a_keyless_server_and_merges_into_the_users_entry(monkeypatch):
    from triattn_local.serve import openclaw

    answers = {"/v1/models": {"data": [{"id": "qwen3-8b", "context_length": 32768}]},
               "/props": {"triattn": {"reasoning": True, "api_key": False, "max_tokens": None}}}
    monkeypatch.setattr(openclaw, "_get", lambda url, key: answers[url[len("http://h:1"):]])
    entry = openclaw.provider_entry("http://h:1/v1", "sk-unneeded")
    assert "apiKey" not in entry and entry["baseUrl"] == "http://h:1/v1"
    (card,) = entry["models"]
    assert card["contextWindow"] == 32768 and card["maxTokens"] == 8192
    assert card["compat"] == {"thinkingFormat": "qwen-chat-template"}
    users = {"baseUrl": "http://old:8000/v1", "apiKey": "local", "headers": {"X-A": "1"},
             "models": [{"id": "qwen3-8b", "alias": "q", "contextWindow": 4096,
                         "compat": {"supportsTools": False, "thinkingFormat": "openai"}},
                        {"id": "other-model", "contextWindow": 1000}]}
    merged = openclaw.merge_entry(users, entry)
    assert merged["baseUrl"] == "http://h:1/v1" and "apiKey" not in merged and merged["headers"] == {"X-A": "1"}
    mine, other = merged["models"]
    assert mine["alias"] == "q" and mine["contextWindow"] == 32768
    assert mine["compat"] == {"supportsTools": False, "thinkingFormat": "qwen-chat-template"}
    assert other == {"id": "other-model", "contextWindow": 1000}
    answers["/props"]["triattn"]["reasoning"] = False
    assert "compat" not in openclaw.provider_entry("http://h:1", None)["models"][0]
