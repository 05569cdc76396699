"""Prefix reuse on OpenClaw's request pattern: a 5-turn agent session against `triattn serve`, each turn sent to a
server that keeps cache snapshots (reuse) and to one that keeps none (--max-conversations 0: cold), greedy.

The pattern is what OpenClaw 2026.9 sends (docs: /work/shared/notes/openclaw-contract.md): a long system prompt
(~40k characters) and 12 tools, the conversation so far, and a transient last user message
(<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>> …) that the next turn does not replay; at turn 4 the first user message is
rewritten (as a memory flush or an edit does), so only the system prompt and tools are shared with earlier turns.

Per turn: prompt tokens, tokens served from a snapshot (cached_tokens), time to first token (TTFT, streamed: the
first chunk after the role chunk) on both servers, and whether the two replies are identical (exact reuse gives the
same greedy tokens as cold). The model is a small random-init Qwen3 with a 32k context and a BPE tokenizer
(tests/agent_model.py), run on the CPU; TriAttention at the default budget (B = 2048, N = 128).

    python benchmarks/openclaw_prefix_reuse.py [--model DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from agent_model import internal_context, make_agent_model, system_prompt, tools  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, extra: list[str], threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "triattn_local.cli", "serve", str(model), "--port", str(port),
                             "--device", "cpu", "--temperature", "0", *extra], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, base + "/v1"
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit("the server did not get ready")


def turn(client, messages, tool_list, max_tokens: int) -> dict:
    """One streamed request: TTFT, the reply (reasoning, content, tool calls) and usage."""
    t0 = time.perf_counter()
    ttft, reasoning, content, calls, usage = None, "", "", [], None
    stream = client.chat.completions.create(model="agent", messages=messages, tools=tool_list, stream=True,
                                            max_completion_tokens=max_tokens, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        delta = c.delta
        text = getattr(delta, "reasoning_content", None) or ""
        if ttft is None and (text or delta.content or delta.tool_calls or c.finish_reason):
            ttft = time.perf_counter() - t0
        reasoning += text
        content += delta.content or ""
        for call in delta.tool_calls or []:
            calls.append((call.function.name, call.function.arguments))
    return {"ttft": ttft, "reply": (reasoning, content, calls), "content": content, "usage": usage}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="the agent model directory [default: built now in a temporary folder]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server (OMP_NUM_THREADS)")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    from openai import OpenAI

    work = Path(tempfile.mkdtemp(prefix="openclaw-bench-"))
    model = Path(args.model) if args.model else make_agent_model(work / "agent")
    warm_proc, warm_url = start(model, ["--served-model-name", "agent"], args.threads, work / "reuse.log")
    cold_proc, cold_url = start(model, ["--served-model-name", "agent", "--max-conversations", "0"], args.threads,
                                work / "cold.log")
    try:
        warm, cold = OpenAI(base_url=warm_url, api_key="x"), OpenAI(base_url=cold_url, api_key="x")
        system, tool_list = system_prompt(), tools()
        users = ["Summarise the workspace notes.", "Which files changed today?", "Draft a reply to the team.",
                 "Plan tomorrow's tasks.", "Check the build and report."]
        history: list[dict] = [{"role": "system", "content": system}]
        rows = []
        for k in range(1, 6):
            if k == 4:  # a rewritten history message: the first user message edited
                history[1] = {"role": "user", "content": users[0] + " (edited after a memory flush)"}
            history.append({"role": "user", "content": users[k - 1]})
            messages = history + [{"role": "user", "content": internal_context(k)}]
            w = turn(warm, messages, tool_list, args.max_tokens)
            c = turn(cold, messages, tool_list, args.max_tokens)
            u = w["usage"]
            rows.append((k, u.prompt_tokens, u.prompt_tokens_details.cached_tokens, c["ttft"], w["ttft"],
                         w["reply"] == c["reply"]))
            history.append({"role": "assistant", "content": w["content"]})
        chars = sum(len(m["content"]) for m in messages)
        schema = len(json.dumps(tool_list))
        print(f"model: {model} (random init, 32k context, BPE); last prompt: messages of {chars} characters + "
              f"12 tools of {schema}; torch threads {args.threads}")
        print("| turn | prompt tokens | from cache | cold TTFT | reused TTFT | speed-up | same reply as cold |")
        print("|---:|---:|---:|---:|---:|---:|:---:|")
        for k, prompt, cached, cold_t, warm_t, same in rows:
            print(f"| {k} | {prompt} | {cached} ({cached / prompt:.0%}) | {cold_t * 1000:.0f} ms | "
                  f"{warm_t * 1000:.0f} ms | {cold_t / warm_t:.1f}x | {'yes' if same else 'NO'} |")
        later = rows[1:]
        share = min(r[2] / r[1] for r in later)
        speed = min(r[3] / r[4] for r in later)
        print(f"turns 2-5: at least {share:.0%} of the prompt from cache (target 90 %), TTFT at least {speed:.1f}x "
              f"lower than cold (target 5x); replies identical to cold: {all(r[5] for r in rows)}")
    finally:
        for proc in (warm_proc, cold_proc):
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)  # the model built here and the server logs


if __name__ == "__main__":
    main()
