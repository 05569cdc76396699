"""`triattn run`: one prompt in, a streamed completion out, and a one-line summary.

Every flag, path and the prompt are checked before the model loads (checks.py). Ctrl-C while generating stops the
generation like a stop button: the text so far stays, the summary says `cancelled`, and the exit code is 0; a second
Ctrl-C (or one during loading) interrupts at once.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys

from . import checks
from .errors import UserError


def read_prompt(prompt: str | None) -> str:
    """The prompt argument, else stdin: UTF-8 text that is not empty or only whitespace."""
    if prompt is not None:
        return checks.text("the prompt", prompt)
    if sys.stdin is None or sys.stdin.isatty():
        raise UserError("no prompt: give one as an argument or on stdin")
    stream = getattr(sys.stdin, "buffer", None)
    raw = stream.read() if stream is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
    text = checks.decode(raw, "the prompt on stdin")
    if not text.strip():
        raise UserError("empty prompt on stdin")
    return text


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def check_run_options(model, method, budget, divide_length, window, sink, protect_prefill, pruning_mode, stats,
                      max_tokens, temperature, top_p, seed, device, dtype, backend, no_compress=False):
    """Everything `run` (and `chat`) can check without torch; returns (policy or None, sampling params)."""
    from .backends import choose_backend
    from .methods import check_method
    from .policy import BudgetPolicy
    from .sampling import SamplingParams

    choose_backend(backend)
    check_method(method)
    checks.choice("--device", device, checks.DEVICES)
    checks.choice("--dtype", dtype, checks.DTYPES)
    for flag, value in (("--budget", budget), ("--divide-length", divide_length)):
        checks.integer(flag, value, 1)
    for flag, value in (("--window", window), ("--sink", sink)):
        checks.integer(flag, value, 0)
    checks.integer("--max-tokens", max_tokens, 1)
    checks.number("--temperature", temperature, 0, 2)
    checks.number("--top-p", top_p, 0, 1, low_open=True)
    checks.integer("--seed", seed, 0, checks.SEED_MAX)
    policy = None
    if not no_compress and budget is not None:
        policy = BudgetPolicy(budget, divide_length, window, sink, protect_prefill, pruning_mode)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if model is not None:
        checks.model(model, backend)
    if stats is not None:
        checks.stats_file(stats)
    return policy, params


@contextlib.contextmanager
def _ctrl_c_cancels(session):
    """The first Ctrl-C cancels the generation (it ends after the current token); the next one interrupts."""
    def cancel(signum, frame):
        session.cancel()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    try:
        previous = signal.signal(signal.SIGINT, cancel)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_command(model, prompt, no_compress, method, budget, divide_length, window, sink, protect_prefill, pruning_mode,
                stats, max_tokens, temperature, top_p, seed, raw, device, dtype, backend, kv_trace) -> None:
    from .engine import CompressionEvent, CompressionSettings, DoneEvent, TextEvent
    from .files import atomic_path

    # Everything cheap is checked before a model loads.
    policy, params = check_run_options(model, method, budget, divide_length, window, sink, protect_prefill,
                                       pruning_mode, stats, max_tokens, temperature, top_p, seed, device, dtype,
                                       backend, no_compress=no_compress)
    if kv_trace is not None:
        checks.output_file(kv_trace, "KV trace")
    text = read_prompt(prompt)

    from .backends import llamacpp_runs, load_engine
    from .stats_cache import resolve_stats

    engine = load_engine(model, backend=backend, device=device, dtype=dtype,
                         llamacpp_ok=llamacpp_runs(policy is not None, method, pruning_mode, dtype))
    needs_stats = policy is not None and method == "triattention"
    settings = CompressionSettings(policy=policy, stats=resolve_stats(engine, stats) if needs_stats else None,
                                   method=method)
    session = engine.session(settings)
    ids = engine.encode_prompt(text, raw=raw)
    done = None
    with contextlib.ExitStack() as stack:
        # The trace goes to a temporary file, renamed into place when generation ends (also after a Ctrl-C stop).
        trace = open(stack.enter_context(atomic_path(kv_trace)), "w") if kv_trace else None  # noqa: SIM115
        if trace:
            stack.callback(trace.close)
        stack.enter_context(_ctrl_c_cancels(session))
        for event in session.generate(ids, params):
            if isinstance(event, TextEvent):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, CompressionEvent) and trace:
                for line in event.record.trace_lines():
                    trace.write(json.dumps(line) + "\n")
            elif isinstance(event, DoneEvent):
                done = event
    sys.stdout.write("\n")
    sys.stdout.flush()
    m = done.metrics
    saved = f" (full: {human_bytes(m.kv_bytes_full)})" if policy else ""
    print(
        f"[{done.generated_tokens} tokens · {done.decode_tokens_per_second:.1f} tok/s ({engine.backend}) · "
        f"peak KV {m.peak_retained_tokens} tokens · KV {human_bytes(m.kv_bytes)}{saved} · "
        f"{m.rounds} compression rounds · {done.finish_reason}]",
        file=sys.stderr,
    )
