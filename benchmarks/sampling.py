"""Host sampling cost per token at the default settings (temperature 0.6, top-p 0.95) on a 151,936-word vocabulary:
the former full-sort nucleus against the partial-sort one (triattn_local.sampling), side by side in one process.

    python benchmarks/sampling.py
"""

from __future__ import annotations

import time

import numpy as np

from triattn_local.sampling import Sampler, SamplingParams

VOCAB = 151_936


def full_sort_sample(logits: np.ndarray, params: SamplingParams, rng) -> int:
    """The sampler as it was: softmax, a stable argsort of the whole vocabulary, cumsum, draw."""
    z = (logits.astype(np.float64) - logits.max()) / params.temperature
    p = np.exp(z)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    cut = int(np.searchsorted(np.cumsum(p[order]), params.top_p)) + 1
    keep = order[:cut]
    q = np.zeros_like(p)
    q[keep] = p[keep]
    q /= q.sum()
    return int(rng.choice(p.size, p=q))


def per_token_ms(fn, logits, repeats=60) -> float:
    fn(logits)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(logits)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.6, top_p=0.95, seed=0)
    cases = {
        "sharp (a confident next token)": (rng.normal(size=VOCAB) * 2.0).astype(np.float32),
        "flat (top-p needs ~10k tokens)": (rng.normal(size=VOCAB) * 0.5).astype(np.float32),
    }
    cases["sharp (a confident next token)"][123] += 25
    print(f"{'logits':34} {'full sort':>10} {'partial':>10}")
    for name, logits in cases.items():
        old = per_token_ms(lambda x: full_sort_sample(x, params, rng), logits)
        new = per_token_ms(Sampler(params), logits)
        print(f"{name:34} {old:8.2f} ms {new:8.2f} ms")


if __name__ == "__main__":
    main()
