"""Prefix reuse in `triattn serve`: time to first token of a later turn that starts from a kept cache snapshot
(taken after the conversation's last user message), against a cold request of the same length, on the demo model.

    python benchmarks/serve_multiturn.py [--turns 4 --repeats 3 --budget 2048 --device cpu --threads 1]

Each repeat builds a conversation of --turns demo problems (the model thinks and answers each, greedy), then sends
one more short user turn, streamed: the reused request. The cold request is the same conversation with its system
prompt changed in one character, a different one each repeat (same token count, no snapshot matches), also streamed. TTFT is measured
from sending a streamed one-token request to its first chunk after the role chunk. Prints one line per repeat and the medians.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from openai import OpenAI

from triattn_local.demo.task import make_problem


def start_server(args) -> tuple[subprocess.Popen, str, str]:
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, "-m", "triattn_local.cli", "serve", "demo", "--port", str(args.port), "--temperature", "0",
           "--budget", str(args.budget), "--device", args.device]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{args.port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, base, " ".join(cmd[2:])
        except OSError:
            pass
        if proc.poll() is not None:
            sys.exit(f"server exited: {open(log.name).read()}")
        time.sleep(0.5)
    sys.exit("server not ready")


def stream_ttft(client: OpenAI, messages: list) -> tuple[float, object]:
    """(seconds to the first token, usage) of a streamed one-token request: the first chunk after the role chunk
    (the one token's text, or the finish chunk when the parser holds it, e.g. <think>) comes right after it."""
    t0 = time.perf_counter()
    first, usage = None, None
    for chunk in client.chat.completions.create(model="demo", messages=messages, max_tokens=1, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        if first is None and chunk.choices and not chunk.choices[0].delta.role:
            first = time.perf_counter() - t0
    return first, usage


def conversation(client: OpenAI, turns: int, seed: int) -> list:
    """A conversation of `turns` demo problems, each answered by the model (as a client would send it back)."""
    rng = random.Random(10**9 + seed)
    messages = [{"role": "system", "content": "Solve each problem."}]
    for _ in range(turns):
        messages.append({"role": "user", "content": make_problem(rng, 50).prompt})
        r = client.chat.completions.create(model="demo", messages=messages, max_tokens=800)
        m = r.choices[0].message
        messages.append({"role": "assistant", "content": m.content, "reasoning_content": m.reasoning_content})
    return messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the server")
    parser.add_argument("--port", type=int, default=8391)
    args = parser.parse_args()

    proc, base, cmd = start_server(args)
    try:
        client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
        print(f"server: {cmd}" + (f" (OMP_NUM_THREADS={args.threads})" if args.threads else ""))
        cold_times, warm_times = [], []
        for rep in range(args.repeats):
            messages = conversation(client, args.turns, seed=rep) + [
                {"role": "user", "content": "What was the final value of the last problem?"}]
            warm, warm_usage = stream_ttft(client, messages)
            cold_messages = [dict(messages[0], content="Solve each problem" + "!?;:,"[rep % 5])] + messages[1:]
            cold, cold_usage = stream_ttft(client, cold_messages)
            assert warm_usage.prompt_tokens == cold_usage.prompt_tokens
            cold_times.append(cold)
            warm_times.append(warm)
            print(f"repeat {rep}: prompt {warm_usage.prompt_tokens} tokens · reused: "
                  f"{warm_usage.prompt_tokens_details.cached_tokens} cached, TTFT {warm * 1000:.0f} ms · cold: "
                  f"{cold_usage.prompt_tokens_details.cached_tokens} cached, TTFT {cold * 1000:.0f} ms")
        cold_m, warm_m = statistics.median(cold_times), statistics.median(warm_times)
        print(f"median TTFT: cold {cold_m * 1000:.0f} ms, reused {warm_m * 1000:.0f} ms ({cold_m / warm_m:.1f}x faster)")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
