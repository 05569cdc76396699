"""int4 weights in the AWQ "GEMM" layout (what Qwen/Qwen3-32B-AWQ ships), with Triton kernels that dequantize
inside the kernel (int4_kernels.py: a split-K gemv for decode, a tiled matmul for prefill), so a 32B model's weights
are read from memory as 4 bits per value.

Layout, per linear layer with in_features K and out_features N, group size g:
- qweight int32 [K, N/8]: eight 4-bit values per int32 along the output dimension; value n sits in nibble
  AWQ_ORDER[n % 8] of word n // 8 (AWQ's interleaved packing);
- qzeros int32 [K/g, N/8]: the zero points, packed the same way;
- scales float16 [K/g, N].
W[k, n] = (q[k, n] − z[k // g, n]) · s[k // g, n], and y = x @ W (+ bias). The torch functions below are the
reference the kernel is tested against (tests/test_int4.py), and the fallback on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from . import int4_kernels

AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # nibble of output column n % 8 inside its int32


def _nibble_shifts(device) -> torch.Tensor:
    return torch.tensor(AWQ_ORDER, dtype=torch.int32, device=device) * 4


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] → int32 [R, N] of 4-bit values."""
    shifts = _nibble_shifts(packed.device)
    values = (packed[:, :, None] >> shifts) & 0xF  # [R, N/8, 8]
    return values.reshape(packed.shape[0], -1)


def pack(values: torch.Tensor) -> torch.Tensor:
    """int [R, N] of 4-bit values → int32 [R, N/8] in AWQ's order."""
    rows, n = values.shape
    v = values.to(torch.int32).reshape(rows, n // 8, 8) << _nibble_shifts(values.device)
    out = torch.zeros(rows, n // 8, dtype=torch.int32, device=values.device)
    for i in range(8):
        out |= v[:, :, i]
    return out


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float weight [K, N] the packed tensors stand for."""
    q = unpack(qweight)
    z = unpack(qzeros).repeat_interleave(group_size, dim=0)
    s = scales.repeat_interleave(group_size, dim=0)
    return (q - z).float() * s.float()  # float32, as the kernel computes it


def quantize(weight: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max int4 quantization of a linear layer's weight [N, K] (nn.Linear layout) into the AWQ
    layout: for tests and for benchmarks on random weights (AWQ itself also searches scales on activations)."""
    w = weight.t().float()  # [K, N]
    k, n = w.shape
    groups = w.reshape(k // group_size, group_size, n)
    lo, hi = groups.amin(dim=1), groups.amax(dim=1)  # [K/g, N]
    scales = ((hi - lo) / 15).clamp_min(1e-8)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = torch.round(groups / scales[:, None] + zeros[:, None]).clamp(0, 15).reshape(k, n)
    return pack(q.to(torch.int32)), pack(zeros.to(torch.int32)), scales.to(torch.float16)


class AWQLinear(nn.Module):
    """A linear layer with int4 AWQ weights: the Triton kernels on a GPU (int4_kernels.awq_linear picks the decode
    or the prefill kernel by the number of rows), dequantize-then-matmul elsewhere."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qweight", torch.zeros(in_features, out_features // 8, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(in_features // group_size, out_features // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(in_features // group_size, out_features, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=torch.float16)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if int4_kernels.available(x.device):
            y = int4_kernels.awq_linear(x2, self.qweight, self.qzeros, self.scales, self.group_size)
        else:
            y = x2 @ dequantize(self.qweight, self.qzeros, self.scales, self.group_size).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)
