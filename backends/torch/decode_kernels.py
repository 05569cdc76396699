"""Fused Triton kernels for one decode step (a token per row), so a layer is ~10 kernels instead of ~50.

At batch 1 a decode step should cost the time to read the weights once; what it costs beyond that is the fixed
latency of every small kernel between the matrix products (norm, rotary, cache write, softmax, activation …).
These kernels merge them:

- rms_norm: the residual add and the RMSNorm in one pass (the residual is updated in place);
- qk_norm_rope_cache: from the fused q/k/v projection, Qwen3's per-head q/k norm, the rotary embedding, the write
  of k and v into the cache slot, and the rotated query, in one kernel over all heads;
- decode_attention: split-K attention of one query per row over the filled slots of the static cache (flash
  decoding), the GQA group's query heads sharing each key block; the number of filled slots is read on the GPU,
  so the shapes never change and the step can be captured in a CUDA graph;
- silu_mul: SwiGLU's activation on the fused gate/up projection;
- gemv: a single row times a half-precision weight, for batch 1 (measured on an H200 it reads the weight 3–17 %
  faster than cuBLAS on every Qwen3-8B/32B projection); larger batches keep cuBLAS.

Generic Triton (sm_80 and newer, no Hopper-only instructions); tests/test_decode_kernels.py checks each against its
torch form in Triton's interpreter on a CPU and on the GPU with TRIATTN_TEST_DEVICE=cuda.
"""

from __future__ import annotations

import os

import torch

from . import kernels

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_T = 64  # key slots per inner step of the attention kernel
MIN_SPLIT = 4 * BLOCK_T  # a split shorter than this costs more to combine than it saves
MAX_SPLITS = 64  # partial results the combining kernel holds at once
PROGRAMS_PER_SM = 2  # attention programs per multiprocessor: more splits only add combining work (H200 sweep)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n, eps, stride_x, stride_r, stride_o,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < n
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        if HAS_RESIDUAL:  # h = residual + x, rounded to the model's dtype as the unfused model does
            x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32))
            x = x.to(res_ptr.dtype.element_ty)
            tl.store(res_ptr + row * stride_r + cols, x, mask=ok)
        xf = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        y = (xf * inv).to(out_ptr.dtype.element_ty).to(tl.float32) * w
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _qk_norm_rope_cache_kernel(qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                                   slot_ptr, rows_ptr, eps, stride_qkv, stride_qo_b, stride_qo_h, stride_cos,
                                   stride_slot, stride_cb, stride_ch, stride_ct,
                                   heads: tl.constexpr, kv_heads: tl.constexpr, head_dim: tl.constexpr,
                                   HAS_NORM: tl.constexpr):
        lane = tl.program_id(0)
        h = tl.program_id(1)  # 0..heads-1: q; then kv_heads of k; then kv_heads of v
        HALF: tl.constexpr = head_dim // 2
        d = tl.arange(0, HALF)
        src = qkv_ptr + lane * stride_qkv + h * head_dim
        x1 = tl.load(src + d)
        x2 = tl.load(src + HALF + d)
        slot = tl.load(slot_ptr + lane * stride_slot)
        row = tl.load(rows_ptr + lane)  # the lane's cache row
        cos_ptr += lane * stride_cos
        sin_ptr += lane * stride_cos
        if h >= heads + kv_heads:  # v: copied into the cache as it is
            dst = v_cache_ptr + row.to(tl.int64) * stride_cb + (h - heads - kv_heads) * stride_ch + slot * stride_ct
            tl.store(dst + d, x1.to(v_cache_ptr.dtype.element_ty))
            tl.store(dst + HALF + d, x2.to(v_cache_ptr.dtype.element_ty))
        else:
            dtype = x1.dtype
            a = x1.to(tl.float32)
            b = x2.to(tl.float32)
            if HAS_NORM:  # Qwen3's RMSNorm over each head, before the rotation
                inv = tl.rsqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / head_dim + eps)
                w_ptr = qw_ptr if h < heads else kw_ptr
                a = ((a * inv).to(dtype).to(tl.float32) * tl.load(w_ptr + d).to(tl.float32)).to(dtype).to(tl.float32)
                b = ((b * inv).to(dtype).to(tl.float32) * tl.load(w_ptr + HALF + d).to(tl.float32)).to(dtype)
                b = b.to(tl.float32)
            c1 = tl.load(cos_ptr + d).to(tl.float32)
            c2 = tl.load(cos_ptr + HALF + d).to(tl.float32)
            s1 = tl.load(sin_ptr + d).to(tl.float32)
            s2 = tl.load(sin_ptr + HALF + d).to(tl.float32)
            r1 = a * c1 - b * s1  # x·cos + rotate_half(x)·sin, rotate_half(x) = (−x2, x1)
            r2 = b * c2 + a * s2
            if h < heads:
                dst = q_out_ptr + lane * stride_qo_b + h * stride_qo_h
                tl.store(dst + d, r1.to(q_out_ptr.dtype.element_ty))
                tl.store(dst + HALF + d, r2.to(q_out_ptr.dtype.element_ty))
            else:
                dst = k_cache_ptr + row.to(tl.int64) * stride_cb + (h - heads) * stride_ch + slot * stride_ct
                tl.store(dst + d, r1.to(k_cache_ptr.dtype.element_ty))
                tl.store(dst + HALF + d, r2.to(k_cache_ptr.dtype.element_ty))

    @triton.jit
    def _attention_split_kernel(q_ptr, k_ptr, v_ptr, slot_ptr, rows_ptr, part_out_ptr, part_m_ptr, part_l_ptr, scale,
                                stride_slot, stride_qb, stride_qh, stride_kb, stride_kh, stride_kt,
                                kv_heads: tl.constexpr, group: tl.constexpr, G_PAD: tl.constexpr,
                                head_dim: tl.constexpr, SPLIT: tl.constexpr, splits: tl.constexpr,
                                BLOCK: tl.constexpr, IEEE: tl.constexpr):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        lane = pid // kv_heads
        kv_head = pid % kv_heads
        row = tl.load(rows_ptr + lane)  # the lane's cache row
        length = tl.load(slot_ptr + lane * stride_slot) + 1  # the current token's slot is the last one filled
        start = split * SPLIT
        end = tl.minimum(start + SPLIT, length)
        g = tl.arange(0, G_PAD)
        g_ok = g < group
        d = tl.arange(0, head_dim)
        heads = kv_head * group + g
        q = tl.load(q_ptr + lane * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
        base = row.to(tl.int64) * stride_kb + kv_head * stride_kh  # big batches of long caches pass 2^31
        m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
        l_i = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, head_dim), tl.float32)
        for t0 in range(start, end, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            t_ok = t < end
            k = tl.load(k_ptr + base + t[:, None] * stride_kt + d[None, :], mask=t_ok[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + base + t[:, None] * stride_kt + d[None, :], mask=t_ok[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        part = (lane * kv_heads * group + heads) * splits + split  # [B, heads, splits]
        tl.store(part_m_ptr + part, m_i, mask=g_ok)
        tl.store(part_l_ptr + part, l_i, mask=g_ok)
        tl.store(part_out_ptr + part[:, None] * head_dim + d[None, :], acc, mask=g_ok[:, None])

    @triton.jit
    def _attention_combine_kernel(part_out_ptr, part_m_ptr, part_l_ptr, out_ptr, stride_ob, stride_oh,
                                  heads: tl.constexpr, head_dim: tl.constexpr, splits: tl.constexpr,
                                  S_PAD: tl.constexpr):
        pid = tl.program_id(0)  # row * heads + head
        row = pid // heads
        h = pid % heads
        s = tl.arange(0, S_PAD)
        s_ok = s < splits
        m = tl.load(part_m_ptr + pid * splits + s, mask=s_ok, other=float("-inf"))
        l = tl.load(part_l_ptr + pid * splits + s, mask=s_ok, other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)  # empty splits weigh nothing
        total = tl.sum(w * l, axis=0)
        d = tl.arange(0, head_dim)
        parts = tl.load(part_out_ptr + (pid * splits + s[:, None]) * head_dim + d[None, :], mask=s_ok[:, None],
                        other=0.0)
        acc = tl.sum(w[:, None] * parts, axis=0)
        tl.store(out_ptr + row * stride_ob + h * stride_oh + d, (acc / total).to(out_ptr.dtype.element_ty))

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, n, stride_x, stride_o, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n
        gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        up = tl.load(x_ptr + row * stride_x + n + cols, mask=ok, other=0.0)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # silu in the model's dtype, then the product, as torch does
        tl.store(out_ptr + row * stride_o + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=ok)


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_w + k[None, :], mask=(n[:, None] < N) & k_ok[None, :],
                        other=0.0)
            x = tl.load(x_ptr + k, mask=k_ok, other=0.0)
            acc += w.to(tl.float32) * x[None, :].to(tl.float32)
        tl.store(out_ptr + n, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=n < N)

    # The configurations that won on the H200 for the Qwen3 projections (a short list keeps the first run's
    # compile and tuning time small); the interpreter runs one.
    _GEMV_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                     for bn, bk, w, st in [(2, 1024, 4, 4), (2, 1024, 4, 2), (4, 512, 4, 4), (4, 512, 4, 2),
                                           (4, 1024, 8, 2), (16, 1024, 8, 2), (16, 1024, 8, 4)]]
    if _INTERPRET:
        _gemv = _gemv_kernel
    else:
        try:
            _gemv = triton.autotune(_GEMV_CONFIGS, key=["N", "K"], cache_results=True)(_gemv_kernel)
        except TypeError:  # a Triton without on-disk autotune results
            _gemv = triton.autotune(_GEMV_CONFIGS, key=["N", "K"])(_gemv_kernel)


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [1, K] @ weight [N, K]ᵀ → [1, N] (nn.Linear's layout, no bias)."""
    n, k = weight.shape
    out = torch.empty(1, n, device=x.device, dtype=x.dtype)
    fixed = {"BLOCK_N": 4, "BLOCK_K": 64} if _INTERPRET else {}
    _gemv[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](x, weight, out, n, k, weight.stride(0), **fixed)
    return out


def linear(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """module(x) for a decode step: one half-precision row through gemv, anything else as the module computes it
    (cuBLAS for several rows, the int4 kernels for AWQ layers)."""
    if isinstance(module, torch.nn.Linear) and x.shape[0] == 1 and x.dtype in (torch.float16, torch.bfloat16) \
            and module.weight.stride(-1) == 1:
        y = gemv(x, module.weight)
        return y if module.bias is None else y + module.bias
    return module(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of x [R, n], or, with a residual, of residual + x, which is also written back into `residual`."""
    out = torch.empty_like(x)
    n = x.shape[-1]
    res = residual if residual is not None else x
    _rms_norm_kernel[(x.shape[0],)](x, res, weight, out, n, eps, x.stride(0), res.stride(0), out.stride(0),
                                    HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
                                    num_warps=8 if n >= 4096 else 4)
    return out


def _lanes(batch: int, slot: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Each lane's cache row (lane b is row b unless given) and the slot tensor's stride (0: one slot for all)."""
    if rows is None:
        rows = torch.arange(batch, device=slot.device)
    return rows, 0 if slot.numel() == 1 else slot.stride(0)  # an expanded slot has stride 0 too


def qk_norm_rope_cache(qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                       cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot: torch.Tensor, heads: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [B, (heads + 2·Hkv)·D] → rotated queries [B, heads, D]; k (normed, rotated) and v go to cache slot
    `slot` of k/v_cache [R, Hkv, C, D]. cos/sin: the rotary factors, [D] (one position for all lanes) or [B, D];
    slot: one slot for all lanes (1 element) or one per lane [B]; rows [B]: each lane's cache row (default b)."""
    batch = qkv.shape[0]
    kv_heads, dim = k_cache.shape[1], k_cache.shape[3]
    q = torch.empty(batch, heads, dim, device=qkv.device, dtype=qkv.dtype)
    has_norm = q_norm is not None
    rows, stride_slot = _lanes(batch, slot, rows)
    cos, sin = cos.contiguous(), sin.contiguous()
    _qk_norm_rope_cache_kernel[(batch, heads + 2 * kv_heads)](
        qkv, q_norm if has_norm else cos, k_norm if has_norm else cos, cos, sin, q, k_cache, v_cache, slot, rows,
        eps, qkv.stride(0), q.stride(0), q.stride(1), 0 if cos.dim() == 1 else cos.stride(0), stride_slot,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        heads=heads, kv_heads=kv_heads, head_dim=dim, HAS_NORM=has_norm, num_warps=1,
    )
    return q


def attention_splits(batch: int, kv_heads: int, capacity: int, device: torch.device) -> tuple[int, int]:
    """(splits, slots per split): enough programs to keep every SM busy, each split a whole number of blocks."""
    wanted = triton.cdiv(PROGRAMS_PER_SM * kernels.sm_count(device), batch * kv_heads)
    splits = max(1, min(wanted, triton.cdiv(capacity, MIN_SPLIT), MAX_SPLITS))
    per_split = triton.cdiv(triton.cdiv(capacity, splits), BLOCK_T) * BLOCK_T
    return triton.cdiv(capacity, per_split), per_split


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor,
                     scale: float, rows: torch.Tensor | None = None) -> torch.Tensor:
    """One query per lane q [B, H, D] over slots 0..slot of its cache row of k/v_cache [R, Hkv, C, D] → [B, H, D].
    slot: one for all lanes (1 element) or one per lane [B]; rows [B]: each lane's cache row (default b)."""
    batch, heads, dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    splits, per_split = attention_splits(batch, kv_heads, capacity, q.device)
    part_out = torch.empty(batch, heads, splits, dim, device=q.device, dtype=torch.float32)
    part_m = torch.empty(batch, heads, splits, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    rows, stride_slot = _lanes(batch, slot, rows)
    _attention_split_kernel[(batch * kv_heads, splits)](
        q, k_cache, v_cache, slot, rows, part_out, part_m, part_l, scale,
        stride_slot, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        kv_heads=kv_heads, group=group, G_PAD=max(16, triton.next_power_of_2(group)), head_dim=dim,
        SPLIT=per_split, splits=splits, BLOCK=BLOCK_T, IEEE=q.dtype == torch.float32, num_warps=4,
    )
    out = torch.empty_like(q)
    _attention_combine_kernel[(batch * heads,)](
        part_out, part_m, part_l, out, out.stride(0), out.stride(1),
        heads=heads, head_dim=dim, splits=splits, S_PAD=triton.next_power_of_2(splits),
        num_warps=8 if splits > 16 else 2,
    )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[B, 2I] (gate then up) → silu(gate) · up [B, I]."""
    batch, two_n = gate_up.shape
    n = two_n // 2
    out = torch.empty(batch, n, device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _silu_mul_kernel[(batch, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0), out.stride(0), BLOCK=block,
                                                     num_warps=4)
    return out
