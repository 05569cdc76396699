"""`triattn serve demo` as a client sees it: a real server process driven by the official openai client and by raw
HTTP. The demo model really thinks (<think> lines </think>) and answers "The final value is N.", so the reasoning
split, usage and conversation reuse are checked on a real model's output."""

import json

import openai
import pytest
from serve_helpers import CLI, assert_openai_error, demo_problem, start

BUDGET, DIVIDE = 1024, 64


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start(CLI + ["serve", "demo", "--budget", str(BUDGET), "--divide-length", str(DIVIDE), "--window", "256",
                     "--temperature", "0"], tmp_path_factory, "serve-demo")
    yield s
    s.stop()
    assert "Traceback" not in s.output()


def test_health_is_503_while_loading_then_200(server):
    assert server.health_seen[-1] == 200
    assert 503 in server.health_seen, server.health_seen  # the port answers before the model is loaded
    assert server.get("/health") == (200, {"status": "ok"})


def test_models_props_and_discovery(server):
    status, models = server.get("/v1/models")
    assert status == 200
    (model,) = models["data"]
    assert model["id"] == "demo" and model["object"] == "model"
    assert model["context_length"] == 8192  # the model's logical context, not the KV budget
    assert model["meta"]["kv_budget"] == BUDGET
    status, props = server.get("/props")
    assert status == 200
    assert props["default_generation_settings"]["n_ctx"] == 8192
    assert props["triattn"]["budget"] == BUDGET and props["triattn"]["reasoning"] is True


def test_chat_non_stream_and_stream_agree_and_split_reasoning(server):
    problem = demo_problem(30, seed=1)
    client = server.client()
    messages = [{"role": "user", "content": problem.prompt}]
    whole = client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=400)
    choice = whole.choices[0]
    assert choice.finish_reason == "stop"
    message = choice.message
    assert message.content == f"The final value is {problem.answer}."  # the thinking is not in content
    reasoning = message.reasoning_content
    assert reasoning.count("\n") == 29 and reasoning.startswith("029:") and "<think>" not in reasoning
    assert not message.tool_calls

    chunks = list(client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=400,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed_reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                                 for c in chunks if c.choices)
    assert content == message.content and streamed_reasoning == reasoning
    kinds = [("r" if getattr(c.choices[0].delta, "reasoning_content", None) else "c")
             for c in chunks if c.choices and (c.choices[0].delta.content or
                                               getattr(c.choices[0].delta, "reasoning_content", None))]
    assert "".join(kinds).strip("r").strip("c") == ""  # all reasoning first, then the content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.prompt_tokens == whole.usage.prompt_tokens == len(problem.prompt) + 19  # one token a character, + template
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert 0 < usage.completion_tokens_details.reasoning_tokens < usage.completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    kv = usage.model_extra["kv"]
    assert kv["budget"] == BUDGET and kv["logical_tokens"] == usage.prompt_tokens + usage.completion_tokens - 1


def test_second_turn_starts_from_the_first_turns_snapshot(server):
    problem = demo_problem(30, seed=2)
    client = server.client()
    messages = [{"role": "system", "content": "Solve it."}, {"role": "user", "content": problem.prompt}]
    first = client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=400)
    assert first.choices[0].finish_reason == "stop"
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    before = server.metrics()
    # the client sends back what it received: content as text parts, reasoning echoed
    messages += [{"role": "assistant", "content": [{"type": "text", "text": first.choices[0].message.content}],
                  "reasoning_content": first.choices[0].message.reasoning_content},
                 {"role": "user", "content": "Again, please."}]
    second = client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=5)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # the first prompt was kept up to its last message boundary, before \n<|im_start|>assistant\n (one token a
    # character, special tokens one each); the reply and the new turn were prefilled
    assert cached == first.usage.prompt_tokens - len("\n_assistant\n")
    # the cache holds exactly the prompt as rendered now (the template dropped the first turn's reasoning)
    kv = second.usage.model_extra["kv"]
    assert kv["logical_tokens"] == second.usage.prompt_tokens + second.usage.completion_tokens - 1
    after = server.metrics()
    assert after['triattn_conversation_reuse_total{result="hit"}'] == before['triattn_conversation_reuse_total{result="hit"}'] + 1
    assert after["triattn_cache_snapshots"] >= before["triattn_cache_snapshots"] + 2  # after the reply, after the turn
    # an edited first message: only the system prompt is shared
    messages[1] = {"role": "user", "content": problem.prompt + "\n"}
    third = client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=5)
    assert third.usage.prompt_tokens_details.cached_tokens == len("_system\nSolve it._")


def test_thinking_off_gives_a_reply_without_reasoning(server):
    """The demo model always thinks; with enable_thinking false its prompt ends in an empty <think> block (the
    server writes it: the demo's template has no switch) and <think> is never sampled."""
    problem = demo_problem(10, seed=4)
    r = server.client().chat.completions.create(
        model="demo", messages=[{"role": "user", "content": problem.prompt}], temperature=0, max_tokens=40,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.reasoning_content is None and r.usage.completion_tokens_details.reasoning_tokens == 0
    assert "<think>" not in (r.choices[0].message.content or "") and r.choices[0].message.content
    on = server.client().chat.completions.create(
        model="demo", messages=[{"role": "user", "content": problem.prompt}], temperature=0, max_tokens=40)
    assert on.usage.completion_tokens_details.reasoning_tokens > 0  # the same request thinks otherwise


def test_text_completions_compress_and_continue(server):
    client = server.client()
    prompt = demo_problem(300, seed=3).prompt * 6  # ~2400 tokens: past the budget, so prefill compresses
    first = client.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=0)
    kv = first.usage.model_extra["kv"]
    assert kv["logical_tokens"] == first.usage.prompt_tokens + 7
    assert kv["retained_tokens"] <= BUDGET + DIVIDE < kv["logical_tokens"]
    assert kv["compression_rounds"] >= 1
    assert first.choices[0].finish_reason == "length" and first.usage.completion_tokens == 8
    # appending to the text starts from the snapshot at the first prompt's last cut (every 256 tokens)
    second = client.completions.create(model="demo", prompt=prompt + first.choices[0].text + "000:",
                                       max_tokens=3, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens == (first.usage.prompt_tokens - 1) // 256 * 256
    # token ids work as a prompt too, streamed
    chunks = list(client.completions.create(model="demo", prompt=[5, 70, 71], max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == 3 and 1 <= chunks[-1].usage.completion_tokens <= 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")


def test_seed_makes_sampling_reproducible(server):
    client = server.client()
    kwargs = dict(model="demo", prompt="hello world", max_tokens=24, temperature=1.5, top_p=1.0)
    a = client.completions.create(seed=7, **kwargs).choices[0].text
    b = client.completions.create(seed=7, **kwargs).choices[0].text
    others = {client.completions.create(seed=s, **kwargs).choices[0].text for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) > 1


def test_prompt_over_the_context_is_a_400_openclaw_compacts_on(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "7" * 9000}],
                                       max_completion_tokens=100)
    assert e.value.status_code == 400
    error = e.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    message = error["message"]
    assert "maximum context length is 8192 tokens" in message
    assert f"requested {9000 + 20 + 100} tokens" in message  # the template's 20 tokens around the message


def test_errors_are_openai_shaped(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    cases = [
        ({"model": "demo", "messages": []}, "messages"),
        ({"model": "demo"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, "n"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages.0.content"),
    ]
    for body, param in cases:
        status, answer = server.post("/v1/chat/completions", body)
        error = assert_openai_error(status, answer, 400)
        assert error["param"] == param and error["type"] == "invalid_request_error", (body, error)
    status, answer = server.post("/v1/chat/completions", b'{"messages": [', {"Content-Type": "application/json"})
    assert "JSON" in assert_openai_error(status, answer, 400)["message"]
    assert_openai_error(*server.get("/v1/nothing-here"), 404)
    assert_openai_error(*server.get("/v1/chat/completions"), 405)
    status, answer = server.post("/v1/completions", {"prompt": [10**9]})
    assert assert_openai_error(status, answer, 400)["param"] == "prompt"


def test_metrics_in_prometheus_text(server):
    client = server.client()
    client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "3"}], max_tokens=4)
    status, text = server.get("/metrics")
    assert status == 200 and "# TYPE triattn_requests_total counter" in text
    m = server.metrics()
    assert m['triattn_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert m["triattn_generation_tokens_total"] >= 4 and m["triattn_prompt_tokens_total"] > 0
    assert m["triattn_compression_rounds_total"] >= 1  # the long text completion above
    assert 0 < m["triattn_kv_retained_tokens"] <= m["triattn_kv_logical_tokens"]
    assert m["triattn_kv_bytes_saved"] >= 0 and m["triattn_process_resident_memory_bytes"] > 10**7
    assert m["triattn_decode_tokens_per_second"] > 0
    assert json.dumps(m)  # every sample parsed as a number
