"""Triton kernels for the CUDA hot paths: TriAttention key scoring and in-place cache compaction.

Both are generic Triton (no Hopper-only instructions): they run on sm_80 and newer, and under TRITON_INTERPRET=1
on a CPU, which is how CI checks them against the reference scorer (tests/test_triton_kernels.py). The torch
forms (cache.score_keys_torch, torch.gather) stay the fallback wherever Triton or a GPU is missing.

score_keys: one pass over a layer's cached keys. A program owns one (row, KV head, block of slots): it loads the
block of keys once and scores it for every query head of the GQA group, the virtual-query dot product plus the
magnitude term Σ_f w_f |k_f|, so the keys are read from memory exactly once per round.

compact_: the kept slots of each (row, KV head) are moved to the front of the same buffer. Kept indices are
ascending, so slot j is filled from keep[j] ≥ j; one program walks its row's blocks in order, loading a block's
sources before storing it, and never overwrites a slot a later block still has to read. No second buffer is needed,
which is what lets a pre-allocated cache of capacity B+N stay at one address (for CUDA graphs).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch fallbacks are used instead
    triton = None


def available(device: torch.device | str) -> bool:
    """Whether the backend should use the Triton kernels for tensors on this device: a GPU of sm_80 or newer."""
    if triton is None:
        return False
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_capability(torch.device(device))[0] >= 8  # bf16 and Triton's sm_80 baseline
    return False  # on a CPU the torch forms are faster than Triton's interpreter (which the tests use directly)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of the device, for sizing split-K grids; 4 on a CPU (the interpreter: a few splits, so the
    tests exercise the splitting)."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


if triton is not None:

    @triton.jit
    def _score_keys_kernel(
        keys_ptr, vq_ptr, mw_ptr, out_ptr,
        T, kv_heads, rows_per_layer, stride_vl, stride_ml,
        stride_kb, stride_kh, stride_kt,
        stride_ob, stride_oh,
        head_dim: tl.constexpr, group: tl.constexpr, HALF_SPLIT: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        block = tl.program_id(2)
        F: tl.constexpr = head_dim // 2
        t = block * BLOCK_T + tl.arange(0, BLOCK_T)
        f = tl.arange(0, F)
        layer = row // rows_per_layer  # rows of every layer in one launch: each layer has its own virtual queries
        vq_ptr += layer * stride_vl
        mw_ptr += layer * stride_ml
        t_ok = t < T
        base = keys_ptr + row.to(tl.int64) * stride_kb + kv_head * stride_kh + t[:, None] * stride_kt
        if HALF_SPLIT:  # pair f is (d = f, d = f + D/2): Qwen, Llama in HF layout
            re_idx = f
            im_idx = f + F
        else:  # pair f is (d = 2f, d = 2f + 1)
            re_idx = 2 * f
            im_idx = 2 * f + 1
        re = tl.load(base + re_idx[None, :], mask=t_ok[:, None], other=0.0).to(tl.float32)  # [BLOCK_T, F]
        im = tl.load(base + im_idx[None, :], mask=t_ok[:, None], other=0.0).to(tl.float32)
        mag = tl.sqrt(re * re + im * im)
        for g in range(group):
            h = kv_head * group + g
            vq_re = tl.load(vq_ptr + h * head_dim + re_idx).to(tl.float32)  # [F]
            vq_im = tl.load(vq_ptr + h * head_dim + im_idx).to(tl.float32)
            w = tl.load(mw_ptr + h * F + f).to(tl.float32)
            score = tl.sum(re * vq_re[None, :] + im * vq_im[None, :] + mag * w[None, :], axis=1)  # [BLOCK_T]
            tl.store(out_ptr + row.to(tl.int64) * stride_ob + h * stride_oh + t, score, mask=t_ok)

    # Block sizes are tuned per GPU by autotune (the interpreter has no timer: it uses one fixed block).
    _INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
    _score_keys_tuned = _score_keys_kernel if _INTERPRET else triton.autotune(
        configs=[triton.Config({"BLOCK_T": bt}, num_warps=w) for bt in (32, 64, 128) for w in (2, 4)],
        key=["head_dim", "group"],
    )(_score_keys_kernel)

    @triton.jit
    def _compact_kernel(
        buf_ptr, keep_ptr, K,
        stride_bb, stride_bh, stride_bt,
        stride_kb, stride_kh,
        kv_heads,
        head_dim: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row = pid // kv_heads
        kv_head = pid % kv_heads
        d = tl.arange(0, head_dim)
        base = buf_ptr + row.to(tl.int64) * stride_bb + kv_head * stride_bh  # a whole cache exceeds 2^31
        keep_base = keep_ptr + row.to(tl.int64) * stride_kb + kv_head * stride_kh
        for start in range(0, K, BLOCK_T):  # in order: sources of later blocks lie at or after their slots
            j = start + tl.arange(0, BLOCK_T)
            ok = j < K
            src = tl.load(keep_base + j, mask=ok, other=0)
            block = tl.load(base + src[:, None] * stride_bt + d[None, :], mask=ok[:, None])
            tl.debug_barrier()
            tl.store(base + j[:, None] * stride_bt + d[None, :], block, mask=ok[:, None])
            tl.debug_barrier()


def score_keys(keys: torch.Tensor, virtual_query: torch.Tensor, magnitude_weight: torch.Tensor,
               pairing: str = "half") -> torch.Tensor:
    """keys [R, kv_heads, T, D] (any float dtype; T may be a prefix of a larger buffer) → scores [R, heads, T]
    float32, equal to cache.score_keys_torch. With virtual queries [L, heads, D] and magnitude weights
    [L, heads, D/2] of L layers, the rows are L layers' batches one after the other (R = L·B): every layer of the
    cache is scored in one launch."""
    rows, kv_heads, length, dim = keys.shape
    vq = torch.as_tensor(virtual_query).to(device=keys.device, dtype=torch.float32)
    mw = torch.as_tensor(magnitude_weight).to(device=keys.device, dtype=torch.float32)
    if vq.dim() == 2:
        vq, mw = vq[None], mw[None]
    vq, mw = vq.contiguous(), mw.contiguous()
    layers, heads = vq.shape[0], vq.shape[1]
    if rows % layers:
        raise ValueError(f"{rows} key rows cannot be split into {layers} layers")
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    out = torch.empty(rows, heads, length, device=keys.device, dtype=torch.float32)
    grid = lambda meta: (rows, kv_heads, triton.cdiv(length, meta["BLOCK_T"]))  # noqa: E731
    fixed = {"BLOCK_T": 64} if _INTERPRET else {}
    _score_keys_tuned[grid](
        keys, vq, mw, out, length, kv_heads, rows // layers, vq.stride(0), mw.stride(0),
        keys.stride(0), keys.stride(1), keys.stride(2),
        out.stride(0), out.stride(1),
        head_dim=dim, group=heads // kv_heads, HALF_SPLIT=pairing == "half", **fixed,
    )
    return out


def compact_(buffer: torch.Tensor, keep: torch.Tensor, block_t: int = 64) -> None:
    """In place: buffer[b, h, :K] = buffer[b, h, keep[b, h]] for a buffer [B, kv_heads, capacity, D] and ascending
    kept indices keep [B, kv_heads, K]. Slots from K on are left as they were (stale)."""
    batch, kv_heads, _, dim = buffer.shape
    if buffer.stride(-1) != 1:
        raise ValueError("compact_ needs the last dimension contiguous")
    keep = keep.to(device=buffer.device, dtype=torch.int64).contiguous()
    _compact_kernel[(batch * kv_heads,)](
        buffer, keep, keep.shape[-1],
        buffer.stride(0), buffer.stride(1), buffer.stride(2),
        keep.stride(0), keep.stride(1),
        kv_heads, head_dim=dim, BLOCK_T=block_t,
    )
