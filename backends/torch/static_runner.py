"""The bounded-cache runner (engine.ModelRunner) over StaticKVModel: KV memory allocated once at capacity B + N,
decode steps replayed from a CUDA graph, scoring and compaction with the Triton kernels on a GPU.

It is the torch backend's fast path for TriAttention on CUDA; on a CPU it runs the same code without the graph and
with the torch forms of the kernels, which is how CI checks it against the transformers path."""

from __future__ import annotations

import copy

import numpy as np
import torch

from ...scorer import TriAttentionScorer
from . import kernels
from .cache import score_keys_torch
from .plan import expand_keep, plan_keep_rows
from .static_model import GraphedDecodeStep, StaticKVModel


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device without holding the host: on CUDA through pinned memory, asynchronously. A copy
    from ordinary (pageable) memory waits for the work queued ahead of it, so inside a round queued behind a decode
    step it held the host for the rest of that step (H100, session 8: 7.75 ms of host time a round for 0.68 ms of
    device work)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


class StaticRunner:
    """capacity: the most slots the cache will hold (TriAttention's B + N), allocated once and never exceeded. None
    when that is not known up front (full attention): the cache starts at initial_capacity slots (doubled until the
    first forward fits) and doubles whenever it is full, into new buffers that the filled slots are copied to."""

    initial_capacity = 4096

    def __init__(self, model: StaticKVModel, capacity: int | None, use_graph: bool | None = None):
        # A shallow copy: the same modules and weights, but this runner's own cache buffers (k_cache, v_cache are
        # plain attributes), so that sessions of one engine (the server's conversations) never share a cache.
        self.model = copy.copy(model)
        self.grows = capacity is None
        self.capacity = capacity or 0  # a growing runner allocates on its first forward
        self.device = model.lm_head.weight.device
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        self.use_kernels = kernels.available(self.device)
        self.model.fused_decode = self.use_kernels  # the fused Triton decode step (decode_kernels.py)
        self.batch = 0
        self.step: GraphedDecodeStep | None = None
        self.device_logits = False  # engine.keep_logits_on_device turns it on for loops that sample with Sampler
        self.reset()

    def reset(self) -> None:
        self.length = 0  # filled slots, the same in every row, layer and KV head

    def _ensure_batch(self, batch: int, needed: int = 0) -> None:
        """Buffers of `batch` rows and self.capacity slots. A growing runner first doubles its capacity until `needed`
        slots fit, and keeps the filled slots (same batch) in the bigger buffers."""
        grow = self.grows and needed > self.capacity
        if grow:
            capacity = self.capacity or self.initial_capacity
            while capacity < needed:
                capacity *= 2
            self.capacity = capacity
        if grow or batch != self.batch or self.model.k_cache is None or self.model.capacity != self.capacity:
            filled = None
            if grow and self.length and self.model.k_cache is not None:
                filled = (self.model.k_cache[:, :, :, : self.length], self.model.v_cache[:, :, :, : self.length])
            self.model.allocate(batch, self.capacity)
            self.batch = batch
            self.step = GraphedDecodeStep(self.model, batch, self.use_graph) if self.use_graph else None
            if self.use_kernels and self.device.type == "cuda" and not self.grows:  # a growing cache never compresses
                self._compile_kernels()
            if filled is not None:  # after the graph capture, whose warm-up steps write slot 0
                self.model.k_cache[:, :, :, : self.length].copy_(filled[0])
                self.model.v_cache[:, :, :, : self.length].copy_(filled[1])

    @torch.inference_mode()
    def _compile_kernels(self) -> None:
        """Compile (and autotune) the Triton kernels now, before the first token, not in the middle of a round."""
        m = self.model
        keys = m.k_cache.flatten(0, 1)  # as _scores and compact call them: every layer in one launch
        heads = m.model.layers[0].self_attn.heads
        kernels.score_keys(keys, torch.zeros(m.num_layers, heads, m.head_dim),
                           torch.zeros(m.num_layers, heads, m.head_dim // 2))
        identity = torch.arange(self.capacity, device=self.device).expand(keys.shape[0], keys.shape[1], -1)
        kernels.compact_(keys, identity)  # keeps every slot where it is: a no-op that compiles the kernel
        self._warm_plan()

    def _warm_plan(self) -> None:
        """Run the GPU plan once per pruning mode on dummy scores: the first sort, std … of a process loads their
        CUDA kernels (~0.2 s), which belongs before the first token, not inside the first round."""
        from ...policy import PRUNING_MODES, BudgetPolicy

        m, batch, capacity = self.model, self.model.k_cache.shape[1], self.capacity
        heads = m.model.layers[0].self_attn.heads
        scores = torch.zeros(batch, m.num_layers, heads, capacity, device=self.device)
        for mode in PRUNING_MODES:
            policy = BudgetPolicy(max(2, capacity // 2), 1, window=1, sinks=1, pruning_mode=mode)
            rows = {"per_layer_head": m.num_layers * m.kv_heads, "per_head": m.kv_heads}.get(mode, 1)
            positions = torch.arange(capacity, device=self.device).expand(batch, rows, capacity)
            plan_keep_rows(policy, scores, positions, heads // m.kv_heads, "max", capacity, 0)

    @torch.inference_mode()
    def forward(self, token_ids, start_position: int) -> np.ndarray:
        tokens = torch.as_tensor(np.asarray(token_ids, dtype=np.int64), device=self.device)  # [B, n]
        batch, n = tokens.shape
        if self.length == 0 or (self.grows and self.length + n > self.capacity):
            self._ensure_batch(batch, self.length + n)
        if self.length + n > self.capacity:
            raise RuntimeError(f"static KV cache full: {self.length} + {n} slots > capacity {self.capacity}")
        if n == 1 and self.step is not None:
            logits = self.step(tokens, start_position, self.length)
        else:
            positions = torch.arange(start_position, start_position + n, device=self.device)
            slots = torch.arange(self.length, self.length + n, device=self.device)
            logits = self.model(tokens, positions, slots)
        self.length += n
        if self.device_logits and self.device.type == "cuda":  # sampled there: only token ids go to the host
            return logits.float()
        return logits.float().cpu().numpy()

    def keys(self, layer: int) -> torch.Tensor:
        """The filled part of one layer's key buffer: [B, Hkv, T, D] (a view)."""
        return self.model.k_cache[layer, :, :, : self.length]

    def _scores(self, scorer: TriAttentionScorer, round_start: int) -> torch.Tensor:
        """Per-query-head scores [B, L, H, T] of every filled slot, on the device (one kernel for all layers)."""
        if not isinstance(scorer, TriAttentionScorer) or scorer.offset_aggregation != "mean":
            raise ValueError("the static-cache runner scores with TriAttention (mean over offsets) only")
        rq = scorer.round_queries(round_start)
        layers = self.model.num_layers
        if self.use_kernels:
            keys = self.model.k_cache[:, :, :, : self.length].flatten(0, 1)  # [L·B, Hkv, T, D], a view
            scores = kernels.score_keys(keys, to_device(rq.virtual_query, self.device),
                                        to_device(rq.magnitude_weight, self.device), scorer.pairing)
            return scores.unflatten(0, (layers, -1)).transpose(0, 1)
        return torch.stack([score_keys_torch(self.keys(i), rq.virtual_query[i], rq.magnitude_weight[i], scorer.pairing)
                            for i in range(layers)], dim=1)

    @torch.inference_mode()
    def head_scores(self, scorer: TriAttentionScorer, round_start: int) -> np.ndarray:
        return self._scores(scorer, round_start).cpu().numpy()  # [B, L, H, T]: one copy to the host

    @torch.inference_mode()
    def compact(self, keep: np.ndarray | torch.Tensor) -> None:
        """Move the kept slots [B, L, Hkv, K] (ascending) to the front of the buffers, in place (on a GPU one
        kernel per buffer for all layers)."""
        keep_t = torch.as_tensor(keep, device=self.device)
        kept = keep_t.shape[-1]
        for cache in (self.model.k_cache, self.model.v_cache):
            if self.use_kernels:
                kernels.compact_(cache.flatten(0, 1), keep_t.transpose(0, 1).flatten(0, 1))
                continue
            for i in range(self.model.num_layers):
                idx = keep_t[:, i, :, :, None].expand(-1, -1, -1, cache.shape[-1])
                cache[i, :, :, :kept] = torch.gather(cache[i, :, :, : self.length], 2, idx)
        self.length = kept

    @torch.inference_mode()
    def compress(self, states: list, scorer: TriAttentionScorer) -> list:
        """One round for every row, decided on the device (plan.py, the policy's torch form); only the kept
        indices go to the host, where each row's CompressionState records the round. Returns the RoundRecords."""
        return self.compress_start(states, scorer).finish()

    @torch.inference_mode()
    def compress_start(self, states: list, scorer: TriAttentionScorer) -> "PendingRound":
        """compress, with the host left free: the round's device work (scores, plan, compaction) is queued and the
        kept indices start on their way to the host; PendingRound.finish() records the round. The runner's length
        is the kept count already, so the next step can be launched before finish()."""
        first = states[0]
        policy = first.policy
        scores = self._scores(scorer, first.round_start)
        positions = to_device(np.stack([s.row_positions() for s in states]), self.device)
        keep_rows = plan_keep_rows(policy, scores, positions, scorer.group_size, first.group_aggregation,
                                   first.next_position, first.prompt_len)
        self.compact(expand_keep(keep_rows, self.model.num_layers, self.model.kv_heads, policy.pruning_mode))
        return PendingRound(states, keep_rows)

    @torch.inference_mode()
    def save(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the filled slots (prefix reuse): K and V [L, B, Hkv, T, D]."""
        return (self.model.k_cache[:, :, :, : self.length].clone(),
                self.model.v_cache[:, :, :, : self.length].clone())

    @torch.inference_mode()
    def load(self, saved: tuple[torch.Tensor, torch.Tensor]) -> None:
        keys, values = saved
        self.length = 0
        self._ensure_batch(keys.shape[1], keys.shape[3])
        self.model.k_cache[:, :, :, : keys.shape[3]].copy_(keys)
        self.model.v_cache[:, :, :, : keys.shape[3]].copy_(values)
        self.length = keys.shape[3]

    @torch.inference_mode()
    def select_rows(self, rows: list[int]) -> None:
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        k, v = self.model.k_cache[:, idx].clone(), self.model.v_cache[:, idx].clone()
        self.batch = 0
        self._ensure_batch(len(rows))  # a new graph for the smaller batch
        self.model.k_cache.copy_(k)
        self.model.v_cache.copy_(v)


class PendingRound:
    """A round whose device work is queued: its kept indices [B, rows, K] are copied to pinned host memory behind
    it, and finish() waits for that copy alone, then has each row's CompressionState record the round. Until then
    the states still hold the positions from before the round, so nothing may read them in between."""

    def __init__(self, states: list, keep_rows: torch.Tensor):
        self.states = states
        self.ready = None
        if keep_rows.is_cuda:
            self.keep = torch.empty(keep_rows.shape, dtype=keep_rows.dtype, pin_memory=True)
            self.keep.copy_(keep_rows, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.keep = keep_rows

    def finish(self) -> list:
        if self.ready is not None:
            self.ready.synchronize()
        return [state.record_round(rows) for state, rows in zip(self.states, self.keep.numpy())]
