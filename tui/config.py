"""What `triattn chat` was started with: the model, the compression policy and sampling, validated up front."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..methods import check_method
from ..policy import BudgetPolicy
from ..sampling import SamplingParams

DEFAULT_BUDGET = 2048


@dataclass(frozen=True)
class ChatConfig:
    model: str = "demo"
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    method: str = "triattention"
    budget: int | None = DEFAULT_BUDGET  # None: full attention (no compression)
    divide_length: int = 128
    window: int = 128
    sink: int = 0
    protect_prefill: bool = False
    pruning_mode: str = "auto"  # per_head, or what the backend can do (global on llama.cpp)
    stats: str | None = None  # stats file; None: next to the model, cached, or calibrated once
    max_tokens: int = 4096
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int | None = None
    system: str | None = None

    def __post_init__(self):
        check_method(self.method)
        self.policy()  # raises UserError on a bad budget, window, mode …
        self.sampling()

    def policy(self) -> BudgetPolicy | None:
        if self.budget is None:
            return None
        return BudgetPolicy(self.budget, self.divide_length, self.window, self.sink, self.protect_prefill,
                            self.pruning_mode)

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed)

    def with_(self, **changes) -> "ChatConfig":
        """A copy with changes, validated (UserError when the result is not a valid policy)."""
        return replace(self, **changes)
