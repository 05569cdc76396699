"""`triattn bench`: decode speed and memory of a real model shape on random weights, full KV vs TriAttention, with
HF transformers (eager, DynamicCache) as the familiar baseline, all in one process so the ratios are side by side.

Decode speed depends on shapes, not on weight values, so the weights are random and the cache is filled with random
keys and values up to the context length instead of running a prefill. Full KV attends over `context` slots;
TriAttention keeps `budget` slots and every `divide_length` steps scores them (Triton), plans the round (plan.py,
the core policy's torch form, on the GPU) and compacts in place, between CUDA-graph replays. The time of those
rounds is included in the TriAttention step time and reported as its share.

Roofline: a decode step must read every weight and every cached K/V once; (weight bytes + KV bytes) / the measured
copy bandwidth of the GPU is the fastest possible step.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

SHAPES = {
    "qwen3-8b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=151936, rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6,
                     tie_word_embeddings=False),
    "qwen3-32b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=5120,
                      intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8,
                      head_dim=128, vocab_size=151936, rope_theta=1000000.0, max_position_embeddings=40960,
                      rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen3-32b-int4": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=5120,
                           intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                           num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1000000.0,
                           max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
                           quantization_config=dict(quant_method="awq", bits=4, group_size=128, version="gemm",
                                                    zero_point=True)),
    "qwen3-0.6b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, vocab_size=151936, rope_theta=1000000.0, max_position_embeddings=40960,
                       rms_norm_eps=1e-6, tie_word_embeddings=True),
}


def add_model_shape(name: str, model_dir: Path) -> str:
    """Bench the shape of a model directory (its config.json; its weights are not read): registered under `name`
    next to the built-in shapes, and returned."""
    import json

    from ...errors import UserError
    from .engine import SUPPORTED_ARCHITECTURES

    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise UserError(f"{model_dir}: no config.json to take the model's shape from")
    cfg = {k: v for k, v in json.loads(config_file.read_text()).items()
           if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "auto_map")}
    if not any(a in SUPPORTED_ARCHITECTURES for a in cfg.get("architectures") or []):
        raise UserError(f"{model_dir}: architecture {cfg.get('architectures')} is not supported by the torch backend "
                        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    SHAPES[name] = cfg
    return name

@dataclass
class BenchRow:
    variant: str  # "triattention" | "full" | "hf-eager"
    batch: int
    context: int
    budget: int | None
    step_ms: float | None  # mean wall time of one decode step (all rows), rounds included
    tok_s_per_stream: float | None
    tok_s_total: float | None
    peak_gpu_gib: float | None
    kv_gib: float | None  # K/V bytes held at the end
    compress_share: float | None  # share of decode time spent in compression rounds
    roofline_ms: float | None
    roofline_fraction: float | None
    first_token_s: float | None  # from nothing to the first decoded token (cache allocation, graph capture)
    note: str = ""


def measure_bandwidth(device: str, gib: float = 2.0) -> float:
    """Copy bandwidth in bytes/s (a read and a write per byte), the HBM roofline's denominator."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.float16, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    reps = 20
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * a.element_size() * reps / (time.perf_counter() - t)


def random_model(shape: str, device: str, dtype=torch.bfloat16):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(SHAPES[shape])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for p in model.parameters():  # small random weights: finite activations, any values do for timing
        p.data.normal_(0, 0.02)
    return model.eval()


def random_static_model(shape: str, device: str, dtype=torch.bfloat16):
    """A StaticKVModel of the shape with random weights (int4 AWQ shapes included, which transformers cannot run)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .int4 import AWQLinear
    from .static_model import StaticKVModel

    cfg = dict(SHAPES[shape])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        rotary_type = type(AutoModelForCausalLM.from_config(config).model.rotary_emb)
        model = StaticKVModel(config, None)
    model = model.to_empty(device=device)
    for name, p in model.named_parameters():
        p.data = p.data.to(dtype)
        p.data.fill_(1.0) if "norm" in name else p.data.normal_(0, 0.02)
    for module in model.modules():
        if isinstance(module, AWQLinear):
            module.qweight.random_(-2**31, 2**31 - 1)
            module.qzeros.random_(-2**31, 2**31 - 1)
            module.scales.fill_(0.002)
    with torch.device(device):
        model.rotary = rotary_type(config)
    if model.cfg.get("tie_word_embeddings"):
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a forward reads: parameters and quantized weight buffers (tied tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if "rotary" not in n]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _fill(model, batch: int, slots: int) -> None:
    for cache in (model.k_cache, model.v_cache):
        cache[:, :, :, :slots].normal_()


@torch.inference_mode()
def bench_static(base, shape_stats, batch: int, context: int, budget: int | None, divide_length: int,
                 steps: int, bandwidth: float) -> BenchRow:
    """Our decode path: full KV (budget None, capacity context + steps) or TriAttention (capacity B + N)."""
    from ...compression import CompressionState
    from ...policy import BudgetPolicy
    from ...scorer import TriAttentionScorer
    from .static_runner import StaticRunner

    device = base.lm_head.weight.device
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = base
    if budget is None:
        capacity, scorer, state = context + steps + 1, None, None
    else:
        policy = BudgetPolicy(budget, divide_length, window=128, pruning_mode="per_head")
        capacity = policy.capacity
        scorer = TriAttentionScorer(shape_stats)
        states = [CompressionState(policy, scorer, model.num_layers, model.kv_heads) for _ in range(batch)]
        state = states[0]
    runner = StaticRunner(model, capacity, use_graph=True)
    model = runner.model  # the runner's own view of the weights, holding its cache
    try:
        runner._ensure_batch(batch)
        filled = context if budget is None else budget
        _fill(model, batch, filled)
        runner.length = filled
        for state in states if budget is not None else []:  # each row holds `budget` slots of a `context`-token sequence
            state.positions = np.broadcast_to(np.arange(context - budget, context), (model.num_layers, model.kv_heads,
                                                                                      budget)).copy()
            state._next = context
        tokens = torch.randint(0, model.cfg["vocab_size"], (batch, 1), device=device)
        position = context
        compress_s = 0.0
        first = None
        torch.cuda.synchronize()
        t_start = time.perf_counter()
        for i in range(steps):
            logits = runner.step(tokens, position, runner.length)
            tokens = logits.argmax(-1, keepdim=True)
            runner.length += 1
            position += 1
            if first is None:
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                t_start = time.perf_counter()  # steady state from the second step on
            if state is not None:
                for s in states:
                    s.appended(1)
                if state.needs_compression():  # rows advance in lockstep: they all need a round now
                    torch.cuda.synchronize()
                    tc = time.perf_counter()
                    runner.compress(states, scorer)  # scored, chosen and compacted on the GPU
                    torch.cuda.synchronize()
                    compress_s += time.perf_counter() - tc
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t_start
        step = elapsed / (steps - 1)
        kv_bytes = model.k_cache[:, :, :, : runner.length].numel() * model.k_cache.element_size() * 2
        weights = weight_bytes(model)
        read_kv = model.k_cache.numel() * model.k_cache.element_size() * 2
        roofline = (weights + read_kv) / bandwidth
        row = BenchRow("full" if budget is None else "triattention", batch, context, budget, step * 1e3, 1 / step,
                       batch / step, torch.cuda.max_memory_allocated() / 2**30, kv_bytes / 2**30,
                       compress_s / elapsed if budget else 0.0, roofline * 1e3, roofline / step, first)
    finally:  # an out-of-memory row must not leave its cache and graph behind for the next one
        model.k_cache = model.v_cache = runner.step = None
    return row


@torch.inference_mode()
def bench_hf(hf_model, batch: int, context: int, steps: int) -> BenchRow:
    """transformers' own decode: eager forward per token with a DynamicCache pre-filled to `context`."""
    from transformers import DynamicCache

    device = hf_model.lm_head.weight.device
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg = hf_model.config
    try:
        cache = DynamicCache(config=cfg)
        for i in range(cfg.num_hidden_layers):
            k = torch.randn(batch, cfg.num_key_value_heads, context, cfg.head_dim, device=device, dtype=torch.bfloat16)
            cache.update(k, torch.randn_like(k), i)
        kwarg = "cache" if "cache" in hf_model.forward.__code__.co_varnames else "past_key_values"
        tokens = torch.randint(0, cfg.vocab_size, (batch, 1), device=device)
        times = []
        for i in range(steps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            pos = torch.full((batch, 1), context + i, device=device)
            out = hf_model(input_ids=tokens, position_ids=pos, use_cache=True, **{kwarg: cache})
            tokens = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        step = float(np.mean(times[2:]))
        return BenchRow("hf-eager", batch, context, None, step * 1e3, 1 / step, batch / step,
                        torch.cuda.max_memory_allocated() / 2**30, None, None, None, None, None)
    except torch.OutOfMemoryError:
        return BenchRow("hf-eager", batch, context, None, None, None, None, None, None, None, None, None, None,
                        note="out of memory")
    finally:
        cache = None
        torch.cuda.empty_cache()


def run_bench(shape: str, contexts: list[int], batches: list[int], budget: int, divide_length: int, steps: int,
              hf_steps: int, memory_gib: float | None, out: Path, progress=print) -> list[BenchRow]:
    from ...rope import ModelShape
    from ...stats.format import QueryStats, meta_for_model

    device = "cuda"
    if memory_gib:  # emulate a smaller card (e.g. a 24 GB RTX 4090)
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_gib * 2**30 / total))
    bandwidth = measure_bandwidth(device)
    progress(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    quantized = "quantization_config" in SHAPES[shape]
    hf_model = None if quantized else random_model(shape, device)  # transformers cannot run int4 AWQ by itself
    if quantized:
        model = random_static_model(shape, device)
    else:
        from .static_model import StaticKVModel

        model = StaticKVModel.from_hf(hf_model)  # the same weight tensors
    mshape = ModelShape.from_hf_config(SHAPES[shape])
    rng = np.random.default_rng(0)
    size = (mshape.num_layers, mshape.num_heads, mshape.head_dim // 2)
    inv, scale = mshape.rope_frequencies()
    real, imag = rng.normal(size=size), rng.normal(size=size)
    stats = QueryStats(meta_for_model(mshape, shape), real.astype(np.float32), imag.astype(np.float32),
                       (np.hypot(real, imag) + 0.5).astype(np.float32), inv, scale)
    rows = []
    for context in contexts:
        for batch in batches:
            for variant in ("triattention", "full", "hf-eager"):
                started = time.perf_counter()
                try:
                    if variant == "hf-eager":
                        row = bench_hf(hf_model, batch, context, hf_steps) if hf_steps and hf_model else None
                    else:
                        row = bench_static(model, stats, batch, context, budget if variant == "triattention"
                                           else None, divide_length, steps, bandwidth)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    row = BenchRow(variant, batch, context, budget if variant == "triattention" else None,
                                   *([None] * 9), note="out of memory")
                if row is None:
                    continue
                rows.append(row)
                progress(f"{describe(row)} [{time.perf_counter() - started:.0f} s]")
                write(rows, out, dict(shape=shape, budget=budget, divide_length=divide_length, steps=steps,
                                      bandwidth_tb_s=bandwidth / 1e12, memory_gib=memory_gib,
                                      gpu=torch.cuda.get_device_name(0)))
    return rows


def describe(r: BenchRow) -> str:
    if r.step_ms is None:
        return f"{r.variant:12s} batch {r.batch:3d} ctx {r.context:6d}: {r.note}"
    extra = ""
    if r.roofline_fraction is not None:
        extra = f", {100 * r.roofline_fraction:.0f}% of roofline, compress {100 * (r.compress_share or 0):.1f}%"
    return (f"{r.variant:12s} batch {r.batch:3d} ctx {r.context:6d}: {r.step_ms:.2f} ms/step, "
            f"{r.tok_s_per_stream:.1f} tok/s/stream, {r.tok_s_total:.0f} tok/s total, peak {r.peak_gpu_gib:.1f} GiB"
            + (f", KV {r.kv_gib:.2f} GiB" if r.kv_gib is not None else "") + extra)


def write(rows: list[BenchRow], out: Path, meta: dict) -> None:
    from ...files import write_atomic

    write_atomic(out / "bench.json", json.dumps(dict(meta, rows=[asdict(r) for r in rows]), indent=1))


def plot(json_path: Path, png_path: Path) -> None:
    """Total decode tok/s and peak GPU memory vs context length, per variant and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    rows = [r for r in data["rows"] if r["step_ms"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant in ("triattention", "full", "hf-eager"):
        for batch in sorted({r["batch"] for r in rows}):
            pts = sorted((r for r in rows if r["variant"] == variant and r["batch"] == batch),
                         key=lambda r: r["context"])
            if not pts:
                continue
            label = f"{variant}, batch {batch}"
            style = {"triattention": "-o", "full": "--s", "hf-eager": ":^"}[variant]
            axes[0].plot([r["context"] for r in pts], [r["tok_s_total"] for r in pts], style, label=label)
            axes[1].plot([r["context"] for r in pts], [r["peak_gpu_gib"] for r in pts], style, label=label)
    axes[0].set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode tok/s (all streams)",
                title="throughput")
    axes[1].set(xscale="log", xlabel="context (tokens)", ylabel="peak GPU memory (GiB)", title="memory")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{data['shape']} shape, random bf16 weights, budget {data['budget']}, {data.get('gpu', '')}")
    fig.tight_layout()
    from ...files import atomic_path

    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
