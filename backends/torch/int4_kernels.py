"""Triton kernels for int4 AWQ linear layers (layout: int4.py): a split-K gemv for decode, a tiled matmul for
prefill, and awq_linear, which picks one by the number of rows.

Decode multiplies a row (or a few) by each weight matrix once, so its time is the time to read the packed weights:
a Qwen3-32B decode step reads 16 GB of them, 3.4 ms at an H200's 4.8 TB/s. A tile kernel over (M, N) blocks has
too few programs for that (N / BLOCK_N, each walking all of K) and pads the row to a 16-row matrix-unit tile.
awq_gemv instead (numbers: benchmarks/int4_gemv.py):

- splits K as well as N: the grid is (N blocks, K splits), the split count chosen from the shape so that there are
  WAVES programs per multiprocessor, a split being any run of 8-row blocks (not of whole groups, so that a small
  layer still fills the GPU); the splits add their fp32 partial sums into a zeroed fp32 output with atomic_add,
  cast to x's dtype after;
- loads each packed int32 word once (a thread loads 2 or 4 consecutive words of a row, 8 or 16 bytes) and unpacks
  its eight nibbles in registers (_spread, _nibble_floats);
- turns a nibble into a float without an int→float conversion (a quarter-rate instruction on these GPUs): it is
  masked in place under the exponent bits of 2^23, so the float reads 2^23 + q·2^p exactly (p its bit position),
  and one subtraction of 2^23 + z·2^p gives (q − z)·2^p: the zero point costs nothing beyond that subtraction;
- factors the group scale out, Σ_k x_k (q_kn − z_n) s_n = s_n · Σ_k x_k (q_kn − z_n) over a group's rows, so the
  scale (times 2^−p) is one multiply per column and group, not per weight;
- keeps two blocks of eight rows in flight ahead of the one being computed (software pipelining by hand: left to
  itself, the compiler issues each load just before its use, and the gemv waits on one or two loads at a time);
- multiplies on the CUDA cores in fp32, every row of x with the same unpacked weights (M ≤ GEMV_MAX_M).

awq_matmul dequantizes a [BLOCK_K, BLOCK_N] tile the same way, times the scale, in x's dtype, onto tl.dot, over
(M, N) tiles autotuned per power-of-two bucket of M; up to SPLIT_MAX_M rows it splits K too (fp32 atomics).

Plain Triton only (no Hopper-only instructions): sm_80 and newer. Block shapes, warps and programs per
multiprocessor are autotuned on a GPU; Triton's interpreter (the CPU tests) has no timer and runs one fixed
configuration, and TRIATTN_INT4_AUTOTUNE=0 does the same on a GPU (quick test runs).
"""

from __future__ import annotations

import os

import torch

from . import kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # AWQLinear then falls back to dequantize-then-matmul
    triton = None

EXPONENT = 0x4B000000  # float32 bits of 2^23 (see _nibble_floats)
# Rows up to this go through awq_gemv, more through awq_matmul: on an H200 (Qwen3-32B shapes) the gemv costs
# 1.7x a step's time at M = 4 against M = 1, and at M = 8 about the matmul's.
GEMV_MAX_M = 4
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# TRIATTN_INT4_AUTOTUNE=0: the first configuration of each list instead of autotuning (quick GPU test runs)
_AUTOTUNE = not _INTERPRET and os.environ.get("TRIATTN_INT4_AUTOTUNE", "1") != "0"


def split_count(n: int, k: int, unit: int, block_n: int, programs: int) -> int:
    """K splits so that cdiv(n, block_n) × splits ≈ programs, each split a whole number of `unit`-row blocks, and
    none empty (the kernels compute the same per-split size from the split count)."""
    units = k // unit
    n_blocks = -(-n // block_n)
    split = max(1, min(units, round(programs / n_blocks)))
    per_split = -(-units // split)
    return -(-units // per_split)


if triton is not None:

    @triton.jit
    def _columns(BLOCK_N: tl.constexpr):
        """Where each column's nibble sits (BLOCK_N a multiple of 8), as [1, BLOCK_N] tensors.

        Column n is nibble AWQ_ORDER[n % 8] = (n % 2) * 4 + (n % 8) // 2 of its word: even columns in the low
        half-word, at bit 4 * ((n % 8) // 2); odd ones in the high half-word. The kernels read the high half from
        the word shifted right by 12, where an odd column's nibble sits at bit 4 * ((n % 8) // 2) + 4: returned
        as (odd, p), p the nibble's bit in the word or in the shifted word (p ≤ 16)."""
        j = tl.arange(0, BLOCK_N)[None, :] % 8  # known per register at compile time: the masks become immediates
        odd = j % 2
        return odd, (j // 2) * 4 + odd * 4

    @triton.jit
    def _spread(words):
        """[..., W] int32 → [..., 8W]: each word eight times, in the thread that loaded it (no data movement)."""
        words = tl.interleave(words, words)
        words = tl.interleave(words, words)
        return tl.interleave(words, words)

    @triton.jit
    def _nibble_floats(words, odd, p, exponent):
        """Packed words [..., W] → float32 2^23 + q·2^p [..., 8W], exactly, without an int→float conversion (a
        quarter-rate instruction on these GPUs).

        A column keeps its own nibble, in place (p ≤ 16: inside the 23-bit mantissa), under the exponent bits of
        2^23 (exponent = 0x4B000000), and the float reads 2^23 + q·2^p. Subtracting 2^23 + z·2^p (_group_bias)
        leaves (q − z)·2^p exactly; the 2^−p goes into the group's scale. Per value: one and-or (a single LOP3;
        the word or its shifted copy is chosen per register, at no cost) and one subtraction; the shift by 12 is
        once per word (by 12 rather than 16 so that no nibble sits at bit 0 of it, which the compiler would turn
        into a two-instruction bit-field extract). `exponent` comes in as a run-time argument: as a compile-time
        constant it would be a second immediate in every and-or, which the GPU encodes as an extra move."""
        lo = _spread(words)
        hi = _spread(words >> 12)
        bits = (tl.where(odd != 0, hi, lo) & (0xF << p)) | exponent
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _group_bias(qz_ptr, g, stride_qz, word, w_ok, odd, p):
        """2^23 + z·2^p for group g's zero points, [1, BLOCK_N]: subtracted from _nibble_floats it leaves
        (q − z)·2^p, so the zero point costs nothing beyond the subtraction the float trick needs anyway."""
        zw = _spread(tl.load(qz_ptr + g * stride_qz + word, mask=w_ok, other=0))
        z = (zw >> (odd * 12 + p)) & 0xF
        return (0x4B000000 + (z << p)).to(tl.float32, bitcast=True)  # 2^23 + z·2^p, exactly

    @triton.jit
    def _group_scale(s_ptr, g, stride_s, n, n_ok, p):
        """s · 2^−p for group g, [1, BLOCK_N]: the scale that turns Σ x (q − z)·2^p into the output."""
        s = tl.load(s_ptr + g * stride_s + n, mask=n_ok, other=0.0).to(tl.float32)
        return s * (1.0 / (1 << p).to(tl.float32))

    @triton.jit
    def _load_rows8(qw_ptr, x_ptr, k0, k_end, stride_qw, stride_xm, word, w_ok, m, m_ok):
        """Weight rows k0 … k0 + 7 ([1, BLOCK_W] each) and their x values ([BLOCK_M, 1]), as two tuples; zeros
        from k_end on (the masks are tensors, as the interpreter wants)."""
        w_ok = w_ok & (word * 0 + k0 < k_end)
        m_ok = m_ok & (m * 0 + k0 < k_end)
        w_ptrs = qw_ptr + k0 * stride_qw + word
        x_ptrs = x_ptr + m * stride_xm + k0
        rows = (tl.load(w_ptrs, mask=w_ok, other=0),
                tl.load(w_ptrs + stride_qw, mask=w_ok, other=0),
                tl.load(w_ptrs + 2 * stride_qw, mask=w_ok, other=0),
                tl.load(w_ptrs + 3 * stride_qw, mask=w_ok, other=0),
                tl.load(w_ptrs + 4 * stride_qw, mask=w_ok, other=0),
                tl.load(w_ptrs + 5 * stride_qw, mask=w_ok, other=0),
                tl.load(w_ptrs + 6 * stride_qw, mask=w_ok, other=0),
                tl.load(w_ptrs + 7 * stride_qw, mask=w_ok, other=0))
        xs = (tl.load(x_ptrs, mask=m_ok, other=0.0), tl.load(x_ptrs + 1, mask=m_ok, other=0.0),
              tl.load(x_ptrs + 2, mask=m_ok, other=0.0), tl.load(x_ptrs + 3, mask=m_ok, other=0.0),
              tl.load(x_ptrs + 4, mask=m_ok, other=0.0), tl.load(x_ptrs + 5, mask=m_ok, other=0.0),
              tl.load(x_ptrs + 6, mask=m_ok, other=0.0), tl.load(x_ptrs + 7, mask=m_ok, other=0.0))
        return rows, xs

    @triton.jit
    def _fma_rows8(part, rows, xs, odd, p, exponent, bias):
        """part [BLOCK_M, BLOCK_N] + Σ over the eight rows of x_k · (q_k − z)·2^p."""
        for u in tl.static_range(8):
            w = _nibble_floats(rows[u], odd, p, exponent) - bias  # (q − z)·2^p, exact
            part += xs[u].to(tl.float32) * w
        return part

    @triton.jit
    def _gemv_kernel(
        x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr,
        M, N, N8, K, M_BUCKET, EXPONENT,
        stride_xm, stride_qw, stride_qz, stride_s, stride_om,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WAVES: tl.constexpr,
    ):
        """out[M, N] += x @ W over one (N block, K split), on the CUDA cores, one weight row at a time: the row's
        words are loaded once (8 or 16 bytes a thread), unpacked in registers and multiplied into all M rows.

        A K split is a range of whole 8-row blocks (not whole groups), so that even a small layer gives
        enough programs to keep enough loads in flight. N8 = N // 8 is passed so that its divisibility is known
        (vector loads under the mask); EXPONENT is 0x4B000000 (see _nibble_floats); M_BUCKET and WAVES are for
        autotune (its key, and the grid's programs per multiprocessor)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        BLOCK_W: tl.constexpr = BLOCK_N // 8
        per_split = tl.cdiv(K // 8, tl.num_programs(1)) * 8
        k_start = pid_k * per_split
        k_end = tl.minimum(k_start + per_split, K)

        m = tl.arange(0, BLOCK_M)[:, None]  # [BLOCK_M, 1]
        m_ok = m < M
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # [1, BLOCK_N]
        n_ok = n < N
        word = pid_n * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]  # [1, BLOCK_W]
        w_ok = word < N8
        odd, p = _columns(BLOCK_N)

        # Software pipelining by hand, two blocks of eight rows ahead: the loads of block k0 + 16 are issued before
        # block k0 is computed, and have the time of two blocks to arrive (the compiler, left alone, issues each
        # load just before its use, and the gemv then waits on one or two loads at a time).
        rows, xs = _load_rows8(qw_ptr, x_ptr, k_start, k_end, stride_qw, stride_xm, word, w_ok, m, m_ok)
        rows1, xs1 = _load_rows8(qw_ptr, x_ptr, k_start + 8, k_end, stride_qw, stride_xm, word, w_ok, m, m_ok)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(k_start // GROUP, tl.cdiv(k_end, GROUP)):  # the groups the split overlaps
            # Σ_k x_k (q_kn − z_n) s_n over the group = s_n · Σ_k x_k (q_kn − z_n): the scale once per group
            bias = _group_bias(qz_ptr, g, stride_qz, word, w_ok, odd, p)
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(tl.maximum(k_start, g * GROUP), tl.minimum(k_end, (g + 1) * GROUP), 8):
                rows2, xs2 = _load_rows8(qw_ptr, x_ptr, k0 + 16, k_end, stride_qw, stride_xm, word, w_ok,
                                         m, m_ok)  # (possibly in a later group; masked past the split)
                part = _fma_rows8(part, rows, xs, odd, p, EXPONENT, bias)
                rows, xs, rows1, xs1 = rows1, xs1, rows2, xs2
            acc += part * _group_scale(s_ptr, g, stride_s, n, n_ok, p)
        tl.atomic_add(out_ptr + m * stride_om + n, acc, mask=m_ok & n_ok, sem="relaxed")

    @triton.jit
    def _matmul_kernel(
        x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr,
        M, N, N8, K, M_BUCKET, EXPONENT,
        stride_xm, stride_qw, stride_qz, stride_s, stride_om,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        ATOMIC: tl.constexpr, WAVES: tl.constexpr,
    ):
        """A [BLOCK_M, BLOCK_N] tile of x @ W on tl.dot over one K split: the weight tile is dequantized in
        registers ((q − z) · s in x's dtype, as a dequantized checkpoint would hold it). With ATOMIC the fp32 tile
        is added into an fp32 output (several K splits); without, stored in out's dtype (a single split)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        BLOCK_W: tl.constexpr = BLOCK_N // 8
        n_groups = K // GROUP
        per_split = tl.cdiv(n_groups, tl.num_programs(2))
        k_start = pid_k * per_split * GROUP
        k_end = tl.minimum(k_start + per_split * GROUP, K)

        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]  # [BLOCK_M, 1]
        m_ok = m < M
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        n_ok = n < N
        word = pid_n * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
        w_ok = word < N8
        odd, p = _columns(BLOCK_N)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):  # BLOCK_K divides the group: one zero/scale row per block
            g = k0 // GROUP
            bias = _group_bias(qz_ptr, g, stride_qz, word, w_ok, odd, p)
            scale = _group_scale(s_ptr, g, stride_s, n, n_ok, p)
            k = k0 + tl.arange(0, BLOCK_K)
            words = tl.load(qw_ptr + k[:, None] * stride_qw + word, mask=w_ok, other=0)
            x = tl.load(x_ptr + m * stride_xm + k[None, :], mask=m_ok, other=0.0)
            w = (_nibble_floats(words, odd, p, EXPONENT) - bias) * scale  # (q − z)·s
            if x.dtype == tl.float32:  # full fp32 (not tf32) for a float32 model
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        if ATOMIC:
            tl.atomic_add(out_ptr + m * stride_om + n, acc, mask=m_ok & n_ok, sem="relaxed")
        else:
            tl.store(out_ptr + m * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=m_ok & n_ok)

    def _gemv_configs():
        """Columns a program owns, its warps, programs per multiprocessor (the fastest on an H200 for the Qwen3-32B
        shapes, benchmarks/int4_gemv.py --sweep, and a narrow one for M > 1). A thread owns BLOCK_N / (32 × warps)
        columns: 16 (8-byte loads) leaves registers for more warps; 32 (16-byte loads) fewer instructions per
        byte; 8 suits several rows of x."""
        shapes = ((512, 1, 8), (512, 1, 16), (1024, 1, 8), (1024, 2, 4), (1024, 2, 8), (256, 1, 8), (256, 1, 16))
        return [triton.Config({"BLOCK_N": bn, "WAVES": waves}, num_warps=w, num_stages=1) for bn, w, waves in shapes]

    def _matmul_configs():
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "WAVES": waves}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s, waves in (
                (16, 64, 64, 4, 3, 4), (16, 128, 64, 4, 3, 4), (16, 256, 32, 4, 3, 4), (32, 128, 64, 4, 3, 4),
                (64, 64, 64, 4, 3, 2), (64, 128, 32, 4, 4, 2), (128, 128, 32, 8, 3, 1), (128, 128, 64, 8, 3, 1),
                (128, 256, 32, 8, 3, 1), (64, 256, 32, 8, 3, 1))
        ]

    def _prune_block_k(configs, named_args, **kwargs):
        """BLOCK_K must divide the group (one zero/scale row per K block)."""
        group = kwargs.get("GROUP", named_args.get("GROUP"))
        kept = [c for c in configs if group % c.kwargs["BLOCK_K"] == 0]
        return kept or configs[:1]

    GEMV_CONFIGS = _gemv_configs()
    MATMUL_CONFIGS = _matmul_configs()

    if not _AUTOTUNE:  # the interpreter has no timer: one fixed configuration (the launchers pass it)
        _gemv_tuned, _matmul_tuned = _gemv_kernel, _matmul_kernel
    else:  # autotune keys on the shape and a power-of-two bucket of M; tensor dtypes are part of the key too
        _gemv_tuned = triton.autotune(configs=GEMV_CONFIGS, key=["N", "K", "GROUP", "M_BUCKET"],
                                      reset_to_zero=["out_ptr"])(_gemv_kernel)
        _matmul_tuned = triton.autotune(configs=MATMUL_CONFIGS, key=["N", "K", "GROUP", "M_BUCKET", "ATOMIC"],
                                        prune_configs_by={"early_config_prune": _prune_block_k},
                                        reset_to_zero=["out_ptr"])(_matmul_kernel)


def _check(x, qweight, scales, group_size):
    k = x.shape[1]
    if group_size % 8 or k % group_size or qweight.shape[0] != k or scales.shape[0] != k // group_size:
        raise ValueError(f"in_features {k} must be a multiple of the group size {group_size} (a multiple of 8) "
                         "and match the weights")


def awq_gemv(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             group_size: int, config=None) -> torch.Tensor:
    """x [M, K] (decode: M ≤ GEMV_MAX_M) @ the int4 AWQ weight [K, N] → [M, N] in x's dtype, on the CUDA cores:
    split-K, the splits' fp32 partial sums added with atomics into a zeroed fp32 buffer. `config` (a triton.Config
    of GEMV_CONFIGS) bypasses autotune."""
    _check(x, qweight, scales, group_size)
    m, k = x.shape
    n = scales.shape[1]
    x = x.contiguous()
    out = torch.zeros(m, n, device=x.device, dtype=torch.float32)
    block_m = triton.next_power_of_2(m)
    programs = kernels.sm_count(x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),  # noqa: E731
                         split_count(n, k, 8, meta["BLOCK_N"], meta["WAVES"] * programs))
    if config is not None:  # one given configuration (benchmarks/int4_gemv.py --sweep)
        kernel = _gemv_kernel
        fixed = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    elif _INTERPRET:
        kernel, fixed = _gemv_kernel, dict(BLOCK_N=64, WAVES=1)
    elif not _AUTOTUNE:
        config = GEMV_CONFIGS[0]
        kernel, fixed = _gemv_kernel, dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        kernel, fixed = _gemv_tuned, {}
    kernel[grid](
        x, qweight, qzeros, scales, out, m, n, n // 8, k, block_m, EXPONENT,
        x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
        GROUP=group_size, BLOCK_M=block_m, **fixed,
    )
    return out if x.dtype == torch.float32 else out.to(x.dtype)


SPLIT_MAX_M = 64  # up to this many rows awq_matmul also splits K (the (M, N) tiles alone are too few programs)


def awq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int) -> torch.Tensor:
    """x [M, K] @ the int4 AWQ weight [K, N] → [M, N] in x's dtype, on tl.dot: one program per (M block,
    N block), autotuned per shape and power-of-two bucket of M; for M ≤ SPLIT_MAX_M also split over K, with fp32
    atomics as in awq_gemv, so that a batch of a few rows still fills the GPU."""
    _check(x, qweight, scales, group_size)
    m, k = x.shape
    n = scales.shape[1]
    x = x.contiguous()
    split = m <= SPLIT_MAX_M
    out = torch.zeros(m, n, device=x.device, dtype=torch.float32) if split else \
        torch.empty(m, n, device=x.device, dtype=x.dtype)
    programs = kernels.sm_count(x.device)

    def grid(meta):
        tiles_m, tiles_n = triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"])
        splits = split_count(n, k, group_size, meta["BLOCK_N"], meta["WAVES"] * programs // tiles_m) if split else 1
        return tiles_m, tiles_n, splits

    if _INTERPRET:
        fixed = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=min(32, group_size), WAVES=1)
    elif not _AUTOTUNE:
        config = _prune_block_k(MATMUL_CONFIGS, {}, GROUP=group_size)[0]
        fixed = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        fixed = {}
    _matmul_tuned[grid](
        x, qweight, qzeros, scales, out, m, n, n // 8, k, min(triton.next_power_of_2(m), 4096), EXPONENT,
        x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
        GROUP=group_size, ATOMIC=split, **fixed,
    )
    return out if out.dtype == x.dtype else out.to(x.dtype)


def awq_linear(x2d: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int) -> torch.Tensor:
    """The int4 matmul for x2d [M, K]: awq_gemv for decode-sized M (≤ GEMV_MAX_M), awq_matmul for prefill."""
    if x2d.shape[0] <= GEMV_MAX_M:
        return awq_gemv(x2d, qweight, qzeros, scales, group_size)
    return awq_matmul(x2d, qweight, qzeros, scales, group_size)


def available(device: torch.device | str) -> bool:
    """Whether awq_linear should run for tensors on this device (the same rule as the other kernels)."""
    return triton is not None and kernels.available(device)
