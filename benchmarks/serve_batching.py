"""Continuous batching as `triattn serve` runs it on CUDA: N concurrent streams under a KV memory cap, TriAttention
(B + N slots a stream) against full KV (prompt + output slots a stream, so fewer streams fit), on a real model shape
with random weights (speed depends on shapes, not weight values).

    python benchmarks/serve_batching.py --shape qwen3-8b --streams 1,8,32,64 --kv-memory 40,24 \
        --prompt 1024 --output 8192 --seconds 60

Every stream arrives at once and asks for --output tokens (EOS never ends it early: random weights); the loop is the
server's (serve/scheduler.py BatchedScheduler): each turn one prefill chunk of the oldest stream still reading its
prompt, then one batched decode step for all the others, with each stream's own compression rounds and on-device
sampling (temperature 0.6, top-p 0.95). A configuration stops after --seconds. Reported: streams admitted (what the
memory cap holds), aggregate and per-stream tok/s, time to first token p50/p95 (waiting for a row included), the
share of decode time spent in compression rounds (their device time, and the host's time queuing them) and, with
--probe, the first-token time of one more --prompt-token request arriving while the others decode. `--step-rate`
also times the bare decode step at one stream, `--single TOKENS` one stream end to end through Session.generate
(what `triattn run` runs, default sampling) beside `triattn bench`'s step rate for the same settings, and
`--round-profile` where a compression round's time goes (one stream's rounds timed, one more under
torch.profiler). Prints a JSON line per configuration (and to --out if given).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triattn_local.backends.torch.bench import SHAPES, random_static_model  # noqa: E402
from triattn_local.backends.torch.static_runner import StaticRunner  # noqa: E402
from triattn_local.backends.torch.row_batch import RowBatch, row_bytes, rows_that_fit  # noqa: E402
from triattn_local.continuous import ContinuousBatch  # noqa: E402
from triattn_local.engine import CompressionSettings, Engine, Session, TokenEvent  # noqa: E402
from triattn_local.policy import BudgetPolicy  # noqa: E402
from triattn_local.rope import ModelShape  # noqa: E402
from triattn_local.sampling import SamplingParams  # noqa: E402
from triattn_local.stats.format import QueryStats, meta_for_model  # noqa: E402

SHAPES.setdefault("tiny", dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=64,  # CPU checks
                               intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16, vocab_size=512, rope_theta=10000.0, max_position_embeddings=4096,
                               rms_norm_eps=1e-6, tie_word_embeddings=False))


class CharTokenizer:
    """Decoding for the streams' text: one character a token (the text is not the point, its cost per token is)."""

    eos_token_id = None

    def decode(self, ids, **kwargs) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


class ShapeEngine(Engine):
    """An Engine over a random-weight StaticKVModel: only what continuous batching uses."""

    backend = "torch"

    def __init__(self, shape: str, device: str):
        from transformers import AutoConfig

        cfg = dict(SHAPES[shape])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        self.shape = ModelShape.from_hf_config(config.to_dict())
        self.model = random_static_model(shape, device, torch.bfloat16 if device == "cuda" else torch.float32)
        self.tokenizer = CharTokenizer()
        self.model_id = self.model_path = shape
        self.context_length = cfg["max_position_embeddings"]
        self.kv_bytes_per_token = row_bytes(self.model, 1)

    def new_runner(self, scorer=None, capacity=None):
        """The runner `triattn run` gets on CUDA: the static cache, bounded (TriAttention) or growing (full)."""
        from triattn_local.backends.torch.static_runner import StaticRunner

        return StaticRunner(self.model, capacity if scorer is not None else None)

    def eos_token_ids(self) -> set[int]:
        return set()


def synthetic_stats(shape: ModelShape) -> QueryStats:
    rng = np.random.default_rng(0)
    size = (shape.num_layers, shape.num_heads, shape.head_dim // 2)
    real, imag = rng.normal(size=size), rng.normal(size=size)
    inv, scale = shape.rope_frequencies()
    return QueryStats(meta_for_model(shape, "synthetic"), real.astype(np.float32), imag.astype(np.float32),
                      (np.hypot(real, imag) + 0.5).astype(np.float32), inv, scale)


class RoundTimer:
    """The compression rounds queued while `active` (StaticRunner.compress_start, inside decode steps): the host's
    seconds spent queuing them (not synchronised: what the host loses) and, on a GPU, the device's seconds between
    CUDA events around each (what they add to the decode while the device is the bottleneck, as it is here). On a
    CPU both are the same wall time."""

    def __init__(self, device: str):
        self.host_seconds, self.count = 0.0, 0
        self.events: list = []  # (start, end) CUDA events of each round
        self.active = False
        self.profile_round: int | None = None  # the count at which one round runs under torch.profiler instead
        self.profile_table = ""
        self.cuda = device == "cuda"
        original = StaticRunner.compress_start

        def timed(runner, states, scorer):
            if not self.active:
                return original(runner, states, scorer)
            if self.profile_round == self.count + 1:
                return self._profiled(original, runner, states, scorer)
            start = torch.cuda.Event(enable_timing=True) if self.cuda else None
            if start is not None:
                start.record()
            t0 = time.perf_counter()
            out = original(runner, states, scorer)
            self.host_seconds += time.perf_counter() - t0
            if start is not None:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.events.append((start, end))
            self.count += 1
            return out

        StaticRunner.compress_start = timed

    def device_seconds(self) -> float:
        """The rounds' device time so far (waits for the device)."""
        if not self.cuda:
            return self.host_seconds
        torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in self.events) / 1e3

    def _profiled(self, original, *args):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        if self.cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            out = original(*args)
            if self.cuda:
                torch.cuda.synchronize()
        self.profile_table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
        self.profile_round = None
        return out


def round_profile(engine: ShapeEngine, args, timer: RoundTimer, rounds: int = 8) -> dict:
    """Where a compression round's time goes: one stream (Session.generate, as `triattn run`) decodes through
    `rounds` rounds, each timed (synchronised), and one more runs under torch.profiler, whose table is printed."""
    policy = BudgetPolicy(args.budget, args.divide_length, args.window, 0)
    settings = CompressionSettings(policy, stats=synthetic_stats(engine.shape))
    prompt = [int(x) for x in np.random.default_rng(0).integers(0, 500, size=args.prompt)]
    tokens = max(0, policy.capacity - args.prompt) + (rounds + 1) * args.divide_length + 1
    params = SamplingParams(max_tokens=tokens, temperature=0.6, top_p=0.95, seed=1)
    count0, host0, device0 = timer.count, timer.host_seconds, timer.device_seconds()
    timer.profile_round, timer.profile_table = count0 + rounds + 1, ""
    timer.active = True
    try:
        for _ in engine.session(settings).generate(prompt, params):
            if timer.profile_table:  # the profiled round was the last one wanted
                break
    finally:
        timer.active = False
        timer.profile_round = None
    print(timer.profile_table, file=sys.stderr)
    timed = timer.count - count0
    return dict(kind="round_profile", rounds=timed, profiled=bool(timer.profile_table),
                ms_per_round=round(1e3 * (timer.device_seconds() - device0) / timed, 3) if timed else None,
                host_ms_per_round=round(1e3 * (timer.host_seconds - host0) / timed, 3) if timed else None,
                capacity=policy.capacity, layers=engine.shape.num_layers)


def run_config(engine: ShapeEngine, method: str, streams: int, kv_gib: float, args, timer: RoundTimer) -> dict:
    device = args.device
    if method == "triattention":
        policy = BudgetPolicy(args.budget, args.divide_length, args.window, 0)
        settings = CompressionSettings(policy=policy, stats=synthetic_stats(engine.shape))
        capacity = policy.capacity
    else:
        settings = CompressionSettings(policy=None)
        capacity = args.prompt + args.output + 1
    extra = 1 if args.probe else 0
    per_row = row_bytes(engine.model, capacity)
    rows = rows_that_fit(per_row, int(kv_gib * (1 << 30)) - per_row, streams + extra)
    batch = ContinuousBatch(engine, settings, RowBatch(engine.model, rows, capacity))
    params = SamplingParams(max_tokens=args.output, temperature=0.6, top_p=0.95, seed=1)
    rng = np.random.default_rng(streams)
    prompts = [[int(x) for x in rng.integers(0, 500, size=args.prompt)] for _ in range(streams)]
    queue = list(range(streams))
    live: dict = {}
    first: dict[int, float] = {}
    tokens = [0] * streams
    probe = {"arrive": None, "first": None, "seq": None}
    rounds0, host0, device0 = timer.count, timer.host_seconds, timer.device_seconds()
    decode_s, steps, lanes = 0.0, 0, []
    t0 = time.perf_counter()
    while (queue or live) and time.perf_counter() - t0 < args.seconds:
        while queue and batch.has_room() and (not args.probe or len(live) < rows - 1):
            i = queue.pop(0)
            live[batch.start(prompts[i], params)] = i
        if args.probe and probe["arrive"] is None and not queue and steps >= 50 and \
                all(s.decoding for s in live) and batch.has_room():
            probe["arrive"] = time.perf_counter()
            probe["seq"] = batch.start([int(x) for x in rng.integers(0, 500, size=args.prompt)], params)
        reading = [s for s in live if s.prefill is not None]
        if probe["seq"] is not None and probe["first"] is None:
            reading.insert(0, probe["seq"])
        if reading:
            seq = reading[0]
            events = batch.prefill_step(seq)
            if any(isinstance(e, TokenEvent) for e in events):
                if seq is probe["seq"]:
                    torch.cuda.synchronize() if device == "cuda" else None
                    probe["first"] = time.perf_counter()
                    batch.finish(seq, "cancelled")
                else:
                    first[live[seq]] = time.perf_counter() - t0
                    tokens[live[seq]] += 1
        decoding = [s for s in live if s.decoding]
        if decoding:
            ts = time.perf_counter()
            timer.active = True
            out = batch.decode_step(decoding)
            timer.active = False
            decode_s += time.perf_counter() - ts
            steps += 1
            lanes.append(len(decoding))
            for seq in out:
                tokens[live[seq]] += 1
        for seq in [s for s in live if s.done]:
            batch.finish(seq)
            del live[seq]
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    for seq in list(live):
        batch.finish(seq, "cancelled")
    ttft = np.array([first[i] for i in range(streams) if i in first])
    started = [i for i in range(streams) if i in first]
    per_stream = [tokens[i] / max(1e-9, elapsed - first[i]) for i in started]
    del batch
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(method=method, streams=streams, kv_gib=kv_gib, rows=rows, capacity=capacity,
                kv_gib_used=round(rows * per_row / (1 << 30), 2), seconds=round(elapsed, 1),
                generated=int(sum(tokens)), aggregate_tok_s=round(sum(tokens) / elapsed, 1),
                per_stream_tok_s=round(float(np.median(per_stream)), 1) if per_stream else None,
                ttft_p50_s=round(float(np.quantile(ttft, 0.5)), 3) if ttft.size else None,
                ttft_p95_s=round(float(np.quantile(ttft, 0.95)), 3) if ttft.size else None,
                streams_started=len(started), mean_lanes=round(float(np.mean(lanes)), 1) if lanes else 0,
                rounds=timer.count - rounds0,
                round_share_of_decode=round((timer.device_seconds() - device0) / decode_s, 4) if decode_s else None,
                round_host_share=round((timer.host_seconds - host0) / decode_s, 4) if decode_s else None,
                probe_ttft_s=None if probe["first"] is None else round(probe["first"] - probe["arrive"], 3))


def transformers_baseline(hf_model, bytes_per_token: int, streams: int, kv_gib: float, args) -> dict:
    """What serving with transformers alone gives: static batches through `generate` (DynamicCache, default
    sampling), as many streams per batch as the cap holds at prompt + output tokens each; a batch's first tokens
    all come after its whole prefill, and the streams that do not fit wait for the batch to end."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstToken(LogitsProcessor):
        def __init__(self):
            self.at = None

        def __call__(self, input_ids, scores):
            if self.at is None:
                self.at = time.perf_counter()
            return scores

    per_row = bytes_per_token * (args.prompt + args.output + 1)
    rows = rows_that_fit(per_row, int(kv_gib * (1 << 30)), streams)
    device = hf_model.lm_head.weight.device
    rng = np.random.default_rng(streams)
    generated, first, waves, t0 = 0, [], 0, time.perf_counter()
    while waves * rows < streams and time.perf_counter() - t0 < args.seconds:
        n = min(rows, streams - waves * rows)
        ids = torch.tensor(rng.integers(0, 500, size=(n, args.prompt)), device=device)
        marker = FirstToken()
        start = time.perf_counter()
        out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.6,
                                top_p=0.95, max_new_tokens=args.output, min_new_tokens=args.output,
                                max_time=max(1.0, args.seconds - (start - t0)), logits_processor=LogitsProcessorList([marker]),
                                pad_token_id=0)
        generated += n * (out.shape[1] - args.prompt)
        first += [marker.at - t0] * n
        waves += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    elapsed = time.perf_counter() - t0
    ttft = np.array(first)
    return dict(method="transformers", streams=streams, kv_gib=kv_gib, rows=rows, capacity=args.prompt + args.output + 1,
                seconds=round(elapsed, 1), generated=int(generated), aggregate_tok_s=round(generated / elapsed, 1),
                per_stream_tok_s=round(generated / len(first) / elapsed, 1) if first else None,
                ttft_p50_s=round(float(np.quantile(ttft, 0.5)), 3) if ttft.size else None,
                ttft_p95_s=round(float(np.quantile(ttft, 0.95)), 3) if ttft.size else None,
                streams_started=len(first))


def single_stream(engine: ShapeEngine, method: str, args) -> dict:
    """One stream through Session.generate (the loop `triattn run` uses) with the default sampling, beside the
    decode-step rate `triattn bench` measures for the same shape, budget and mean length (CUDA only)."""
    from triattn_local.backends.torch.bench import bench_static

    stats = synthetic_stats(engine.shape)
    if method == "triattention":
        settings = CompressionSettings(BudgetPolicy(args.budget, args.divide_length, args.window, 0), stats=stats)
    else:
        settings = CompressionSettings(policy=None)
    prompt = [int(x) for x in np.random.default_rng(0).integers(0, 500, size=args.prompt)]
    params = SamplingParams(max_tokens=args.single, temperature=0.6, top_p=0.95, seed=1)
    times = []
    for event in engine.session(settings).generate(prompt, params):
        if isinstance(event, TokenEvent):
            times.append(time.perf_counter())
    e2e = (len(times) - 1) / (times[-1] - times[0])
    line = dict(kind="single_stream", method=method, prompt=args.prompt, tokens=len(times),
                end_to_end_tok_s=round(e2e, 1))
    if args.device == "cuda":
        row = bench_static(engine.model, stats, 1, args.prompt + args.single // 2,
                           args.budget if method == "triattention" else None, args.divide_length, 300, 1.0)
        line.update(bench_tok_s=round(1e3 / row.step_ms, 1), share_of_bench=round(e2e * row.step_ms / 1e3, 3))
    return line


@torch.inference_mode()
def step_rate(engine: ShapeEngine, capacity: int, length: int, device: str, steps: int = 200) -> float:
    """Bare decode steps a second at one stream (the row filled to `length` slots), as `triattn bench` times them."""
    rows = RowBatch(engine.model, 1, capacity)
    runner = rows.acquire()
    runner.length = length
    rows.model.k_cache.normal_()
    rows.model.v_cache.normal_()
    for _ in range(10):
        runner.length = length
        rows.decode([runner], [1], [length])
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.length = length
        rows.decode([runner], [1], [length])
    if device == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--streams", default="1,8,32,64")
    ap.add_argument("--kv-memory", default="40,24", help="GiB caps for the batched KV cache, comma-separated")
    ap.add_argument("--methods", default="triattention,full",
                    help="triattention, full (both continuously batched as the server does) and transformers "
                         "(static batches through transformers' generate, run last on its own copy of the weights)")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--output", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--divide-length", type=int, default=128)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=60.0, help="wall-time limit of each configuration")
    ap.add_argument("--probe", action="store_true", help="one more request (a --prompt long prompt) once the others decode")
    ap.add_argument("--step-rate", action="store_true", help="also time the bare one-stream decode step")
    ap.add_argument("--single", type=int, default=0, metavar="TOKENS",
                    help="also one stream end to end (Session.generate, default sampling) for TOKENS tokens, beside "
                         "`triattn bench`'s step rate")
    ap.add_argument("--round-profile", action="store_true",
                    help="also time the compression rounds of one stream and print one round's torch.profiler table")
    ap.add_argument("--out", help="append the JSON lines to this file")
    args = ap.parse_args()
    engine = ShapeEngine(args.shape, args.device)
    timer = RoundTimer(args.device)
    out = open(args.out, "a") if args.out else None  # noqa: SIM115 - closed below

    def emit(line: dict) -> None:
        print(json.dumps(line), flush=True)
        if out:
            print(json.dumps(line), file=out, flush=True)

    caps = [float(x) for x in args.kv_memory.split(",")]
    stream_counts = [int(x) for x in args.streams.split(",")]
    methods = args.methods.split(",")
    ours = [m for m in methods if m != "transformers"]  # served by our continuous batching
    try:
        for method in ours if args.single else []:
            emit(single_stream(engine, method, args))
        if args.round_profile:
            emit(dict(round_profile(engine, args, timer), shape=args.shape))
        if args.step_rate:
            for method, capacity in (("triattention", args.budget + args.divide_length),
                                     ("full", args.prompt + args.output + 1)):
                line = dict(kind="step_rate", method=method, length=min(capacity - 1, args.prompt + args.output // 2),
                            device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
                line["steps_per_s"] = round(step_rate(engine, capacity, line["length"], args.device), 1)
                emit(line)
        for kv_gib in caps:
            for streams in stream_counts:
                for method in ours:
                    emit(dict(run_config(engine, method, streams, kv_gib, args, timer), shape=args.shape))
        if "transformers" in methods:
            from triattn_local.backends.torch.bench import random_model

            bytes_per_token = engine.kv_bytes_per_token
            del engine  # the static model's weights make room for transformers' own copy
            if args.device == "cuda":
                torch.cuda.empty_cache()
            hf_model = random_model(args.shape, args.device,
                                    torch.bfloat16 if args.device == "cuda" else torch.float32)
            for kv_gib in caps:
                for streams in stream_counts:
                    emit(dict(transformers_baseline(hf_model, bytes_per_token, streams, kv_gib, args), shape=args.shape))
    finally:
        if out:
            out.close()


if __name__ == "__main__":
    main()
