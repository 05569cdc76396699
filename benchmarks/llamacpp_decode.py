"""Decode speed of the llamacpp backend at a long context, with and without TriAttention (CPU unless a GPU build).

    python benchmarks/llamacpp_decode.py [--model DIR|FILE.gguf | --random] [--contexts 4096,8192] [--budget 1024]

Default model: the demo, converted to GGUF (f16) once into triattn's cache; --random: a larger random-init Qwen3
(~140 M parameters, f16) with stats calibrated through llama.cpp. The prompt is `context` tokens of solved demo
problems followed by a long problem the model is in the middle of thinking about; then `tokens` are decoded greedily
(EOS ignored, so every run decodes as many). tok/s = generated tokens / decode seconds, as `triattn run` reports it.
Full attention holds context + tokens cells; TriAttention (global mode) at most budget + divide_length, reading the
keys back and compressing every divide_length tokens, which the tok/s includes.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path


def demo_gguf() -> Path:
    from triattn_local.convert import convert_to_gguf
    from triattn_local.stats_cache import cache_dir

    out = cache_dir().parent / "bench" / "demo-gguf-f16"
    if not (out / "model.gguf").is_file():
        convert_to_gguf("demo", str(out), outtype="f16")
    return out


def random_gguf(layers: int = 12, hidden: int = 1024) -> Path:
    """A larger random-init Qwen3 (12 layers, hidden 1024, 16 heads / 8 KV heads, ~140 M parameters) with the demo's
    tokenizer, converted to f16 GGUF, with stats calibrated through llama.cpp (once, into triattn's cache)."""
    import shutil

    from triattn_local.backends.llamacpp.engine import LlamaCppEngine
    from triattn_local.convert import convert_to_gguf
    from triattn_local.demo.task import calibration_text
    from triattn_local.registry import demo_model_dir
    from triattn_local.stats_cache import STATS_FILE_NAME, cache_dir
    from triattn_local.tiny_model import make_model

    out = cache_dir().parent / "bench" / f"random-qwen3-{layers}x{hidden}-gguf"
    if (out / STATS_FILE_NAME).is_file():
        return out
    src = out.with_name(out.name + "-hf")
    make_model(src, "qwen3", num_hidden_layers=layers, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
               num_attention_heads=16, num_key_value_heads=8, head_dim=64, vocab_size=384, initializer_range=0.02,
               max_position_embeddings=32768)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (src / name).unlink(missing_ok=True)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_dir() / name, src / name)
    convert_to_gguf(str(src), str(out), outtype="f16")
    shutil.rmtree(src)
    engine = LlamaCppEngine(str(out), device="cpu")
    engine.calibrate(calibration_text(1), progress=False, max_tokens=2048).save(out / STATS_FILE_NAME)
    return out


def long_prompt(tokenizer, context: int) -> list[int]:
    """Exactly `context` tokens: solved problems as filler, then a 380-step problem whose thinking has just begun."""
    from triattn_local.demo.task import calibration_text, make_problem

    p = make_problem(random.Random(123), steps=380)
    tail = tokenizer.encode(f"<|im_start|>user\n{p.prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n"
                            + "".join(line + "\n" for line in p.thinking_lines[:3]), add_special_tokens=False)
    filler: list[int] = []
    count = 4
    while len(filler) + len(tail) < context:
        filler = tokenizer.encode(calibration_text(count), add_special_tokens=False)
        count *= 2
    return filler[len(filler) + len(tail) - context:] + tail


def measure(engine, prompt: list[int], settings, tokens: int) -> dict:
    from triattn_local.engine import DoneEvent
    from triattn_local.sampling import SamplingParams

    session = engine.session(settings)
    engine.eos_token_ids = set  # decode exactly `tokens` tokens: a random model may emit EOS at any point
    done = None
    for event in session.generate(prompt, SamplingParams(max_tokens=tokens, temperature=0)):
        if isinstance(event, DoneEvent):
            done = event
    cells = int(session.runner.n_ctx)
    return {"tok_s": done.decode_tokens_per_second, "generated": done.generated_tokens,
            "prefill_s": done.prefill_seconds, "rounds": done.metrics.rounds,
            "peak_kv": done.metrics.peak_retained_tokens, "n_ctx": cells, "finish": done.finish_reason}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file or directory (default: the demo converted to f16 GGUF)")
    ap.add_argument("--random", action="store_true", help="a larger random-init Qwen3 (~140 M parameters) instead")
    ap.add_argument("--contexts", default="4096,8192", help="prompt lengths in tokens")
    ap.add_argument("--tokens", type=int, default=256, help="tokens to decode")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--divide-length", type=int, default=128)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--kv", default="f16", help="KV cache type: f16 | f32 | bf16 | q8_0")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from triattn_local.backends.llamacpp.engine import LlamaCppEngine
    from triattn_local.engine import CompressionSettings
    from triattn_local.policy import BudgetPolicy
    from triattn_local.stats.format import QueryStats
    from triattn_local.stats_cache import STATS_FILE_NAME

    model = Path(args.model) if args.model else random_gguf() if args.random else demo_gguf()
    contexts = [int(c) for c in args.contexts.split(",")]
    engine = LlamaCppEngine(str(model), device="cpu", dtype=args.kv, n_ctx=max(contexts) + args.tokens + 8,
                            n_threads=args.threads)
    stats_path = (model if model.is_dir() else model.parent) / STATS_FILE_NAME
    stats = QueryStats.load(stats_path)
    policy = BudgetPolicy(args.budget, args.divide_length, args.window, 4, pruning_mode="global")
    print(f"model {model} · KV {args.kv} · {engine.n_threads} threads · {os.cpu_count()} CPUs · "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print("command: python " + " ".join(sys.argv))
    print("| context | mode | decode tok/s | tokens | KV cells (n_ctx) | peak KV tokens | rounds | prefill s |")
    print("|---|---|---|---|---|---|---|---|")
    for context in contexts:
        prompt = long_prompt(engine.tokenizer, context)
        for name, settings in (("full attention", CompressionSettings(policy=None)),
                               (f"TriAttention B={args.budget}", CompressionSettings(policy, stats=stats))):
            r = measure(engine, prompt, settings, args.tokens)
            print(f"| {context} | {name} | {r['tok_s']:.1f} | {r['generated']} | {r['n_ctx']} | {r['peak_kv']} | "
                  f"{r['rounds']} | {r['prefill_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
