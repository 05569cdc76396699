"""Batched vs sequential generation: wall time of generate_batch over N prompts of one length against
Session.generate run on each prompt in turn, same settings, greedy; checks that both give the same tokens.

    python benchmarks/batch_generation.py [MODEL] [--prompts 16 --prompt-len 300 --max-tokens 200 --device cpu]

Without MODEL it builds the tiny random-init qwen3 model in a temporary directory. EOS is ignored, so every row
generates exactly --max-tokens tokens (a fixed amount of work). Prints one line per method.
"""

import argparse
import tempfile
import time

import numpy as np

from triattn_local.backends import load_engine
from triattn_local.batch import generate_batch
from triattn_local.engine import CompressionSettings, TokenEvent
from triattn_local.policy import BudgetPolicy
from triattn_local.sampling import SamplingParams


def settings_for(engine, method, budget, divide, window):
    if method == "full":
        return CompressionSettings(policy=None)
    stats = None
    if method == "triattention":  # synthetic stats: the tiny model has random weights anyway
        from triattn_local.stats.format import QueryStats, meta_for_model

        shape = engine.shape
        rng = np.random.default_rng(0)
        size = (shape.num_layers, shape.num_heads, shape.head_dim // 2)
        real, imag = rng.normal(size=size), rng.normal(size=size)
        inv, scale = shape.rope_frequencies()
        stats = QueryStats(meta_for_model(shape, "synthetic"), real.astype(np.float32), imag.astype(np.float32),
                           (np.hypot(real, imag) + 0.5).astype(np.float32), inv, scale)
    return CompressionSettings(policy=BudgetPolicy(budget, divide, window, 4), stats=stats, method=method)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--methods", default="full,triattention,snapkv")
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--divide-length", type=int, default=32)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-sequential", action="store_true", help="time the batch only")
    args = ap.parse_args()

    model = args.model
    if model is None:
        from triattn_local.tiny_model import make_model

        model = str(make_model(tempfile.mkdtemp(prefix="triattn-tiny-"), "qwen3"))
    engine = load_engine(model, device=args.device, dtype=args.dtype)
    engine.eos_token_ids = lambda: set()  # every row generates max_tokens
    rng = np.random.default_rng(0)
    vocab = min(getattr(engine.tokenizer, "vocab_size", 300), 300)
    prompts = [[int(x) for x in rng.integers(5, vocab, size=args.prompt_len)] for _ in range(args.prompts)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    generate_batch(engine, prompts[:2], CompressionSettings(policy=None), SamplingParams(max_tokens=4))  # warm-up
    print(f"{args.prompts} prompts x {args.prompt_len} tokens, {args.max_tokens} generated each, "
          f"{engine.device} {str(engine.dtype).replace('torch.', '')}, budget {args.budget} (compressed methods)")
    for method in args.methods.split(","):
        s = settings_for(engine, method, args.budget, args.divide_length, args.window)
        t = time.perf_counter()
        results = generate_batch(engine, prompts, s, params)
        batched = time.perf_counter() - t
        line = f"{method:13s} batched {batched:7.2f} s ({args.prompts * args.max_tokens / batched:7.1f} tok/s)"
        if not args.no_sequential:
            t = time.perf_counter()
            alone = [[ev.token_id for ev in engine.session(s).generate(p, params) if isinstance(ev, TokenEvent)]
                     for p in prompts]
            sequential = time.perf_counter() - t
            same = sum(a == r.token_ids for a, r in zip(alone, results))
            line += (f"  sequential {sequential:7.2f} s ({args.prompts * args.max_tokens / sequential:7.1f} tok/s)"
                     f"  speed-up {sequential / batched:5.2f}x  same tokens {same}/{args.prompts}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
