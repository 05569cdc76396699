"""Token sampling from last-position logits, written once for every backend (numpy)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import UserError


@dataclass
class SamplingParams:
    max_tokens: int = 1024
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    suppress: tuple[int, ...] = ()  # token ids never sampled (e.g. <think> when a client turned thinking off)

    def __post_init__(self):
        if self.max_tokens < 1:
            raise UserError(f"max tokens must be at least 1 (got {self.max_tokens})")
        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top-p must be in (0, 1] (got {self.top_p})")


class Sampler:
    """Greedy at temperature 0, else temperature + nucleus (top-p) sampling with a seeded generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.params.suppress:
            logits = logits.copy()
            logits[list(self.params.suppress)] = -np.inf
        if self.params.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64)
        with np.errstate(over="ignore"):  # max first: a tiny temperature gives 0 and -inf, never NaN
            z = (z - z.max()) / self.params.temperature
        p = np.exp(z)
        p /= p.sum()
        if self.params.top_p < 1:
            order = np.argsort(-p, kind="stable")
            cumulative = np.cumsum(p[order])
            cut = int(np.searchsorted(cumulative, self.params.top_p)) + 1  # smallest set reaching top_p
            keep = order[:cut]
            p = np.zeros_like(p)
            p[keep] = 1.0
            p *= np.exp(z)
            p /= p.sum()
        return int(self.rng.choice(p.size, p=p))
