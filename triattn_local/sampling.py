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
    """Greedy at temperature 0, else temperature + nucleus (top-p) sampling with a seeded generator.

    Logits on the host (numpy) are sampled here; logits that are a torch tensor on a GPU are sampled there
    (sample_on_device), and MLX arrays where MLX keeps them (sample_on_mlx), so only the token id crosses to the host. Both keep the smallest set of most likely tokens
    whose probability reaches top_p (ties at the edge to the lower token id) and sample from it in proportion."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self._torch_generator = None
        self._mlx_key = None

    def __call__(self, logits) -> int:
        if not isinstance(logits, np.ndarray):
            return self._on_device(logits)
        if self.params.suppress:
            logits = logits.copy()
            logits[list(self.params.suppress)] = -np.inf
        if self.params.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64)
        z -= z.max()  # max first: a tiny temperature gives 0 and -inf, never NaN
        with np.errstate(over="ignore"):
            z /= self.params.temperature
        p = np.exp(z)
        p /= p.sum()
        if self.params.top_p >= 1:
            return draw_index(p, self.rng)
        return sample_nucleus(p, self.params.top_p, z, self.rng)

    def uniform(self, device):
        """This sequence's next uniform draw in [0, 1), a 0-d tensor on `device` (its own seeded generator there)."""
        import torch

        if self._torch_generator is None:
            self._torch_generator = torch.Generator(device=device)
            self._torch_generator.manual_seed(self._device_seed())
        return torch.rand((), generator=self._torch_generator, device=device)

    def _device_seed(self) -> int:
        return self.params.seed if self.params.seed is not None else int(self.rng.integers(2**63 - 1))

    def _on_device(self, logits) -> int:
        if type(logits).__module__.startswith("mlx"):
            import mlx.core as mx

            if self._mlx_key is None:
                self._mlx_key = mx.random.key(self._device_seed() % 2**63)
            self._mlx_key, key = mx.random.split(self._mlx_key)
            return int(sample_on_mlx(logits, self.params, key).item())
        return int(sample_on_device(logits, self.params, uniforms=self.uniform(logits.device)))


def draw_many(samplers: list[Sampler], logits, rows: list[int]) -> list[int]:
    """One token for each of many sequences of a batched decode step, sampler i drawing from logits[rows[i]] as it
    would alone: on a GPU, the sequences that share temperature, top-p and suppressed tokens are sampled in one pass
    over their rows, each with its own uniform, and every id comes to the host in one transfer; elsewhere, one by
    one."""
    if isinstance(logits, np.ndarray) or type(logits).__module__.startswith("mlx"):
        return [s(logits[r]) for s, r in zip(samplers, rows)]
    import torch

    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samplers):
        p = s.params
        groups.setdefault((p.temperature, p.top_p, tuple(p.suppress)), []).append(i)
    ids = torch.empty(len(samplers), dtype=torch.long, device=logits.device)
    for members in groups.values():
        params = samplers[members[0]].params
        uniforms = None
        if params.temperature > 0:
            uniforms = torch.stack([samplers[i].uniform(logits.device) for i in members])
        picked = sample_on_device(logits[torch.tensor([rows[i] for i in members], device=logits.device)], params,
                                  uniforms=uniforms)
        ids[torch.tensor(members, device=logits.device)] = picked
    return ids.tolist()


BINS_PER_NAT = 16  # log-probability bins of 1/16 nat; a bin of a flat 152k vocabulary holds ~2k tokens
NEAR = 8.0  # tokens within 8 nats of the most likely (p ratio > 3e-4) are tried first
LAST_BIN = 40 * BINS_PER_NAT  # everything 40 nats below the most likely token (p < 4e-18) shares the last bin


def draw_index(weights: np.ndarray, rng: np.random.Generator, u: float | None = None) -> int:
    """An index drawn in proportion to non-negative weights (inverse CDF: one uniform, one cumulative sum)."""
    cumulative = np.cumsum(weights)
    u = rng.random() if u is None else u
    i = int(np.searchsorted(cumulative, u * cumulative[-1], side="right"))  # weights[i] > 0: c[i] > u·total ≥ c[i-1]
    return i if i < weights.size else int(np.flatnonzero(weights)[-1])  # u·total rounded onto the very end


class _Nucleus:
    """The nucleus in parts, as binning finds it (see nucleus): `ids` the candidates (None: every token), `p` their
    probabilities, `whole` a mask over them of the bins kept whole, `edge` the edge bin's kept candidates (most
    likely first), `before` the mass of the whole bins."""

    def __init__(self, p: np.ndarray, top_p: float, log_p: np.ndarray):
        top = log_p.max()
        near = log_p >= top - NEAR  # the most likely tokens: usually all the nucleus needs
        if np.count_nonzero(near) * 8 < p.size and np.sum(p, where=near) >= top_p:
            self.ids = np.flatnonzero(near)
            p, log_p = p[self.ids], log_p[self.ids]
        else:  # a flat distribution: every token, without gathering
            self.ids = None
        self.p = p
        scaled = top - log_p
        np.minimum(scaled, LAST_BIN / BINS_PER_NAT, out=scaled)  # clipped first: a tiny temperature would overflow
        scaled *= BINS_PER_NAT
        bins = scaled.astype(np.int32)  # 0: the most likely
        cumulative = np.cumsum(np.bincount(bins, weights=p, minlength=LAST_BIN + 1))
        edge = min(int(np.searchsorted(cumulative, top_p)), LAST_BIN)
        self.before = float(cumulative[edge - 1]) if edge else 0.0
        in_edge = np.flatnonzero(bins == edge)
        in_edge = in_edge[np.argsort(-p[in_edge], kind="stable")]  # most likely first, ties to the lower id
        need = min(int(np.searchsorted(self.before + np.cumsum(p[in_edge]), top_p)) + 1, in_edge.size)
        self.edge = in_edge[:need]
        self.whole = bins < edge

    def token(self, candidate: int) -> int:
        return candidate if self.ids is None else int(self.ids[candidate])


def nucleus(p: np.ndarray, top_p: float, log_p: np.ndarray | None = None) -> np.ndarray:
    """Token ids of the smallest set of most likely tokens whose probability reaches top_p, ties to the lower id:
    exactly what a stable sort of the whole vocabulary keeps, without that sort.

    The tokens within NEAR nats of the most likely are tried first (when they hold top_p, they hold the nucleus);
    they are binned by log-probability (bins are ordered: every token of a bin is more likely than every token of
    the next). The bins before the one where the cumulative mass reaches top_p are kept whole; only that edge
    bin is sorted. O(V), where the full sort took ~21 ms for a 152k vocabulary on a 2-core CPU."""
    if log_p is None:
        with np.errstate(divide="ignore"):
            log_p = np.log(p)
    parts = _Nucleus(p, top_p, log_p)
    kept = np.concatenate([np.flatnonzero(parts.whole), parts.edge])
    return kept if parts.ids is None else parts.ids[kept]


def sample_nucleus(p: np.ndarray, top_p: float, log_p: np.ndarray, rng: np.random.Generator) -> int:
    """A token drawn from the nucleus (as nucleus keeps it) in proportion to p, without listing the nucleus: one
    uniform picks the whole bins (by their mass) or the edge bin's kept tokens, then a token inside."""
    parts = _Nucleus(p, top_p, log_p)
    edge_p = parts.p[parts.edge]
    total = parts.before + float(edge_p.sum())
    u = rng.random() * total
    if u < parts.before:
        return parts.token(draw_index(np.where(parts.whole, parts.p, 0.0), rng, u / parts.before))
    return parts.token(int(parts.edge[draw_index(edge_p, rng, (u - parts.before) / (total - parts.before))]))


def sample_on_device(logits, params: SamplingParams, generator=None, uniforms=None):
    """The same sampling on a torch tensor logits [vocab] (or [B, vocab]), on its device: returns token ids as a
    tensor ([] or [B]); the caller's int() or .tolist() is the one transfer to the host. Each row's token is drawn
    by inversion with one uniform: `uniforms` ([] or [B]), else drawn from `generator`."""
    import torch

    x = logits.float()
    if params.suppress:
        x = x.clone()
        x[..., list(params.suppress)] = float("-inf")
    if params.temperature == 0:
        return x.argmax(dim=-1)
    if uniforms is None:
        uniforms = torch.rand(x.shape[:-1], generator=generator, device=x.device)
    probs = torch.softmax(x / params.temperature, dim=-1, dtype=torch.float64 if x.device.type == "cpu" else None)
    order = None
    if params.top_p < 1:
        # Sort by probability, ties to the lower id (a stable sort of the ids), keep the smallest prefix reaching
        # top_p: a token is kept when the mass before it is still below top_p.
        probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        before = torch.cumsum(probs, dim=-1) - probs
        probs = torch.where(before < params.top_p, probs, 0.0)
    cumulative = torch.cumsum(probs, dim=-1)
    target = (uniforms.to(cumulative.dtype) * cumulative[..., -1]).unsqueeze(-1)
    choice = torch.searchsorted(cumulative, target, right=True)  # the first token whose cumulative mass exceeds it
    total = cumulative[..., -1:].contiguous()  # contiguous: searchsorted warns (and copies) otherwise
    last = torch.searchsorted(cumulative, total)  # where the total is reached: a token with mass
    choice = torch.minimum(choice, last)  # u·total rounded up onto the very end
    if order is not None:
        choice = order.gather(-1, choice)
    return choice.squeeze(-1)


def sample_on_mlx(logits, params: SamplingParams, key):
    """The same sampling on an MLX array logits [vocab] (or [B, vocab]) where MLX keeps it (the GPU on Apple
    silicon): returns token ids as an MLX array; the caller's .item() or .tolist() is the one transfer."""
    import mlx.core as mx

    x = logits.astype(mx.float32)
    if params.suppress:
        banned = mx.zeros((x.shape[-1],), dtype=mx.bool_)
        banned[mx.array(list(params.suppress))] = True
        x = mx.where(banned, float("-inf"), x)
    if params.temperature == 0:
        return mx.argmax(x, axis=-1)
    probs = mx.softmax(x / params.temperature, axis=-1)
    if params.top_p >= 1:
        return mx.random.categorical(mx.log(probs), key=key)
    order = mx.argsort(-probs, axis=-1)  # a stable sort: ties to the lower id, as on the host
    sorted_probs = mx.take_along_axis(probs, order, axis=-1)
    before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs  # kept while the mass before it is below top_p
    kept = mx.where(before < params.top_p, sorted_probs, 0.0)
    choice = mx.random.categorical(mx.log(kept), key=key)
    return mx.take_along_axis(order, mx.expand_dims(choice, -1), axis=-1).squeeze(-1)
