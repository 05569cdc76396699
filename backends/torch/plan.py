"""The budget policy's choice of slots, on the GPU: the torch form of CompressionState.plan's scoring-to-keep step.

For a batch of sequences the host form copies every score to the CPU and selects row by row; at batch 16 on an
8B model that is 160 MB and a fifth of the decode time. This form does the same steps on the device — GQA group
z-scores per query head over the candidate slots, GQA group aggregation, combination for the pruning mode, forced
window / sinks / prompt, best scores with ties to the earlier position, kept slots in position order (policy.py
gives the order and why) — and only the chosen indices travel to the host, where
CompressionState.apply records the round. tests/test_gpu_plan.py checks it equals the core policy.
"""

from __future__ import annotations

import torch

from ...policy import BudgetPolicy


def combine_rows(policy: BudgetPolicy, head_scores: torch.Tensor, positions: torch.Tensor, group_size: int,
                 aggregation: str, prompt_len: int) -> torch.Tensor:
    """[B, layers, heads, T] → [B, rows, T] (float64): policy.combine, for a batch. positions: the rows' slot
    positions [B, rows, T], from which each query head's candidate slots follow."""
    b, layers, heads, t = head_scores.shape
    kv_heads = heads // group_size
    rows_per_layer = 1 if policy.pruning_mode == "global" else kv_heads
    slot_positions = positions.reshape(b, -1, rows_per_layer, t)  # [B, 1 or layers, kv_heads or 1, T]
    if policy.protects_prompt(prompt_len):
        mask = slot_positions >= prompt_len
    else:
        mask = torch.ones_like(slot_positions, dtype=torch.bool)
    x = head_scores.double().reshape(b, layers, kv_heads, group_size, t)
    mask = (mask.unsqueeze(3) & ~torch.isnan(x)).expand_as(x)  # query heads use their KV head's slots
    count = mask.sum(dim=-1, keepdim=True).clamp_min(1)
    mean = torch.where(mask, x, 0.0).sum(dim=-1, keepdim=True) / count
    var = torch.where(mask, (x - mean) ** 2, 0.0).sum(dim=-1, keepdim=True) / count
    z = (x - mean) / var.sqrt().clamp_min(1e-6)
    kv = z.amax(dim=3) if aggregation == "max" else z.mean(dim=3)  # [B, layers, kv_heads, T]
    if policy.pruning_mode == "per_layer_head":
        return kv.reshape(b, -1, t)
    if policy.pruning_mode == "per_head":
        return kv.mean(dim=1)
    return kv.reshape(b, -1, t).amax(dim=1, keepdim=True)


def select_rows(policy: BudgetPolicy, scores: torch.Tensor, positions: torch.Tensor, next_position: int,
                prompt_len: int) -> torch.Tensor:
    """policy.select for a batch: scores, positions [B, rows, T] → kept slot indices [B, rows, K], ascending."""
    t = scores.shape[-1]
    keep = min(policy.budget, t)
    protected = (positions < policy.sinks) | (positions >= next_position - policy.window)
    if policy.protects_prompt(prompt_len):
        protected |= positions < prompt_len
    key = torch.where(torch.isnan(scores), float("-inf"), scores.double())
    key = torch.where(protected, float("inf"), key)
    by_position = torch.argsort(positions, dim=-1, stable=True)  # ties below keep this (earlier) order
    key = torch.gather(key, -1, by_position)
    best = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :keep]
    chosen = torch.gather(by_position, -1, best)
    order = torch.argsort(torch.gather(positions, -1, chosen), dim=-1, stable=True)
    return torch.gather(chosen, -1, order)


def plan_keep_rows(policy: BudgetPolicy, head_scores: torch.Tensor, positions: torch.Tensor, group_size: int,
                   aggregation: str, next_position: int, prompt_len: int) -> torch.Tensor:
    """Per-query-head scores [B, layers, heads, T] and the rows' slot positions [B, rows, T] → keep [B, rows, K]."""
    rows = combine_rows(policy, head_scores, positions, group_size, aggregation, prompt_len)
    return select_rows(policy, rows, positions, next_position, prompt_len)


def expand_keep(keep_rows: torch.Tensor, layers: int, kv_heads: int, mode: str) -> torch.Tensor:
    """[B, rows, K] → [B, layers, kv_heads, K], as CompressionState._expand (per_head and global broadcast)."""
    b, _, k = keep_rows.shape
    if mode == "per_layer_head":
        return keep_rows.reshape(b, layers, kv_heads, k)
    return keep_rows[:, None].expand(b, layers, kv_heads, k)
