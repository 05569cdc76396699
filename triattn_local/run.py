"""`triattn run`: one prompt in, a streamed completion out, and a one-line summary."""

from __future__ import annotations

import json
import sys

from .errors import UserError


def read_prompt(prompt: str | None) -> str:
    if prompt is not None:
        return prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise UserError("no prompt: give one as an argument or on stdin")
    text = sys.stdin.read()
    if not text.strip():
        raise UserError("empty prompt on stdin")
    return text


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def run_command(model, prompt, no_compress, method, budget, divide_length, window, sink, protect_prefill, pruning_mode,
                stats, max_tokens, temperature, top_p, seed, raw, device, dtype, backend, kv_trace) -> None:
    from .backends import choose_backend
    from .engine import CompressionEvent, CompressionSettings, DoneEvent, TextEvent
    from .methods import check_method
    from .policy import BudgetPolicy
    from .sampling import SamplingParams

    # Validate everything cheap before loading a model.
    choose_backend(backend)
    check_method(method)
    policy = None if no_compress else BudgetPolicy(budget, divide_length, window, sink, protect_prefill, pruning_mode)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    text = read_prompt(prompt)
    trace = open(kv_trace, "w") if kv_trace else None  # noqa: SIM115 - closed below

    from .backends import load_engine
    from .stats_cache import resolve_stats

    try:
        engine = load_engine(model, backend=backend, device=device, dtype=dtype)
        needs_stats = policy is not None and method == "triattention"
        settings = CompressionSettings(policy=policy, stats=resolve_stats(engine, stats) if needs_stats else None,
                                       method=method)
        session = engine.session(settings)
        ids = engine.encode_prompt(text, raw=raw)
        done = None
        for event in session.generate(ids, params):
            if isinstance(event, TextEvent):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, CompressionEvent) and trace:
                for line in event.record.trace_lines():
                    trace.write(json.dumps(line) + "\n")
            elif isinstance(event, DoneEvent):
                done = event
    finally:
        if trace:
            trace.close()
    sys.stdout.write("\n")
    m = done.metrics
    saved = f" (full: {human_bytes(m.kv_bytes_full)})" if policy else ""
    print(
        f"[{done.generated_tokens} tokens · {done.decode_tokens_per_second:.1f} tok/s · "
        f"peak KV {m.peak_retained_tokens} tokens · KV {human_bytes(m.kv_bytes)}{saved} · "
        f"{m.rounds} compression rounds · {done.finish_reason}]",
        file=sys.stderr,
    )
