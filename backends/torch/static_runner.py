"""The bounded-cache runner (engine.ModelRunner) over StaticKVModel: KV memory allocated once at capacity B + N,
decode steps replayed from a CUDA graph, scoring and compaction with the Triton kernels on a GPU.

It is the torch backend's fast path for TriAttention on CUDA; on a CPU it runs the same code without the graph and
with the torch forms of the kernels, which is how CI checks it against the transformers path."""

from __future__ import annotations

import numpy as np
import torch

from ...scorer import TriAttentionScorer
from . import kernels
from .cache import score_keys_torch
from .plan import expand_keep, plan_keep_rows
from .static_model import GraphedDecodeStep, StaticKVModel


class StaticRunner:
    def __init__(self, model: StaticKVModel, capacity: int, use_graph: bool | None = None):
        self.model = model
        self.capacity = capacity
        self.device = model.lm_head.weight.device
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        self.use_kernels = kernels.available(self.device)
        self.batch = 0
        self.step: GraphedDecodeStep | None = None
        self.reset()

    def reset(self) -> None:
        self.length = 0  # filled slots, the same in every row, layer and KV head

    def _ensure_batch(self, batch: int) -> None:
        if batch != self.batch or self.model.k_cache is None or self.model.capacity != self.capacity:
            self.model.allocate(batch, self.capacity)
            self.batch = batch
            self.step = GraphedDecodeStep(self.model, batch, self.use_graph) if self.use_graph else None
            if self.use_kernels and self.device.type == "cuda":
                self._compile_kernels()

    @torch.inference_mode()
    def _compile_kernels(self) -> None:
        """Compile (and autotune) the Triton kernels now, before the first token, not in the middle of a round."""
        keys = self.model.k_cache[0]
        heads = self.model.model.layers[0].self_attn.heads
        kernels.score_keys(keys, torch.zeros(heads, self.model.head_dim), torch.zeros(heads, self.model.head_dim // 2))
        identity = torch.arange(self.capacity, device=self.device).expand(keys.shape[0], keys.shape[1], -1)
        kernels.compact_(keys, identity)  # keeps every slot where it is: a no-op that compiles the kernel

    @torch.inference_mode()
    def forward(self, token_ids, start_position: int) -> np.ndarray:
        tokens = torch.as_tensor(np.asarray(token_ids, dtype=np.int64), device=self.device)  # [B, n]
        batch, n = tokens.shape
        if self.length == 0:
            self._ensure_batch(batch)
        if self.length + n > self.capacity:
            raise RuntimeError(f"static KV cache full: {self.length} + {n} slots > capacity {self.capacity}")
        if n == 1 and self.step is not None:
            logits = self.step(tokens, start_position, self.length)
        else:
            positions = torch.arange(start_position, start_position + n, device=self.device)
            slots = torch.arange(self.length, self.length + n, device=self.device)
            logits = self.model(tokens, positions, slots)
        self.length += n
        return logits.float().cpu().numpy()

    def keys(self, layer: int) -> torch.Tensor:
        """The filled part of one layer's key buffer: [B, Hkv, T, D] (a view)."""
        return self.model.k_cache[layer, :, :, : self.length]

    def _scores(self, scorer: TriAttentionScorer, round_start: int) -> torch.Tensor:
        """Per-query-head scores [B, L, H, T] of every filled slot, on the device."""
        if not isinstance(scorer, TriAttentionScorer) or scorer.offset_aggregation != "mean":
            raise ValueError("the static-cache runner scores with TriAttention (mean over offsets) only")
        rq = scorer.round_queries(round_start)
        scores = []
        for i in range(self.model.num_layers):
            if self.use_kernels:
                scores.append(kernels.score_keys(self.keys(i), torch.from_numpy(rq.virtual_query[i]),
                                                 torch.from_numpy(rq.magnitude_weight[i]), scorer.pairing))
            else:
                scores.append(score_keys_torch(self.keys(i), rq.virtual_query[i], rq.magnitude_weight[i],
                                               scorer.pairing))
        return torch.stack(scores, dim=1)

    @torch.inference_mode()
    def head_scores(self, scorer: TriAttentionScorer, round_start: int) -> np.ndarray:
        return self._scores(scorer, round_start).cpu().numpy()  # [B, L, H, T]: one copy to the host

    @torch.inference_mode()
    def compact(self, keep: np.ndarray | torch.Tensor) -> None:
        """Move the kept slots [B, L, Hkv, K] (ascending) to the front of the buffers, in place."""
        keep_t = torch.as_tensor(keep, device=self.device)
        kept = keep_t.shape[-1]
        for cache in (self.model.k_cache, self.model.v_cache):
            for i in range(self.model.num_layers):
                if self.use_kernels:
                    kernels.compact_(cache[i], keep_t[:, i])
                else:
                    idx = keep_t[:, i, :, :, None].expand(-1, -1, -1, cache.shape[-1])
                    cache[i, :, :, :kept] = torch.gather(cache[i, :, :, : self.length], 2, idx)
        self.length = kept

    @torch.inference_mode()
    def compress(self, states: list, scorer: TriAttentionScorer) -> list:
        """One round for every row, decided on the device (plan.py, the policy's torch form); only the kept
        indices go to the host, where each row's CompressionState records the round. Returns the RoundRecords."""
        first = states[0]
        policy = first.policy
        scores = self._scores(scorer, first.round_start)
        positions = torch.as_tensor(np.stack([s.row_positions() for s in states]), device=self.device)
        keep_rows = plan_keep_rows(policy, scores, positions, scorer.group_size, first.group_aggregation,
                                   first.round_start, first.prompt_len)
        self.compact(expand_keep(keep_rows, self.model.num_layers, self.model.kv_heads, policy.pruning_mode))
        return [state.apply(rows)[1] for state, rows in zip(states, keep_rows.cpu().numpy())]

    @torch.inference_mode()
    def select_rows(self, rows: list[int]) -> None:
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        k, v = self.model.k_cache[:, idx].clone(), self.model.v_cache[:, idx].clone()
        self.batch = 0
        self._ensure_batch(len(rows))  # a new graph for the smaller batch
        self.model.k_cache.copy_(k)
        self.model.v_cache.copy_(v)
