"""Read one sequence's cached keys back from llama.cpp, as numpy, for the shared scorer.

llama_state_seq_get_data serialises a sequence's KV cells (llama-kv-cache.cpp, state_write):

    [u32 magic, i32 seq_id]   (llama-context.cpp; absent in older llama.cpp)
    u32 n_stream, then per stream: u32 cell_count, and when it is > 0:
      cell_count × (i32 pos, u32 n_seq_id, n_seq_id × i32 seq_id)       cells in cell order, not position order
      u32 v_trans, u32 n_layer
      n_layer × (i32 ggml_type, u64 row_bytes, cell_count × row_bytes)   K rows: [kv_heads × head_dim] per cell
      then V, which the scorer does not need

K is post-RoPE, in the cache's type (f32, f16, bf16 or q8_0), at the cells' original positions. GGUF Llama weights
are permuted by the converter so that RoPE rotates adjacent pairs (2f, 2f+1); Qwen keeps HF's half split (f, f+D/2).
Keys leave here in HF's half layout either way, so stats measured on the HF model apply unchanged.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

GGML_F32, GGML_F16, GGML_Q8_0, GGML_BF16 = 0, 1, 8, 30
IO_MAGIC = 0xAF143CD8  # llama_context writes it and the seq_id before the cache's own data
TYPE_NAMES = {"f32": GGML_F32, "f16": GGML_F16, "bf16": GGML_BF16, "q8_0": GGML_Q8_0}
Q8_0_BLOCK = 32  # values per q8_0 block: one f16 scale, then 32 int8


def bytes_per_value(ggml_type: int) -> float:
    return {GGML_F32: 4.0, GGML_F16: 2.0, GGML_BF16: 2.0, GGML_Q8_0: 34 / 32}[ggml_type]


@dataclass
class CachedKeys:
    positions: np.ndarray  # [T] int64, ascending
    keys: list[np.ndarray]  # per layer [kv_heads, T, head_dim] float32, half layout, slot j at positions[j]
    key_type: int  # ggml type of the K cache


def read_state(ctx, seq_id: int = 0) -> bytes:
    """The serialised state of one sequence (a copy of its K and V)."""
    import llama_cpp

    size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
    buf = (ctypes.c_uint8 * size)()
    written = llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq_id)
    return bytes(buf)[:written]


def parse_positions(data: bytes) -> tuple[np.ndarray, int]:
    """(positions of the cells in cell order, offset where the layer data starts)."""
    offset = 8 if np.frombuffer(data, np.uint32, 1, 0)[0] == IO_MAGIC else 0  # newer llama.cpp: magic, seq_id
    n_stream = int(np.frombuffer(data, np.uint32, 1, offset)[0])
    if n_stream != 1:
        raise RuntimeError(f"expected one KV stream for one sequence, found {n_stream}")
    count = int(np.frombuffer(data, np.uint32, 1, offset + 4)[0])
    offset += 8
    if count == 0:
        return np.zeros(0, dtype=np.int64), offset
    meta = np.frombuffer(data, np.int32, 3 * count, offset).reshape(count, 3)  # pos, n_seq_id = 1, seq_id
    if not (meta[:, 1] == 1).all():
        raise RuntimeError("a KV cell belongs to several sequences: not the layout this backend writes")
    return meta[:, 0].astype(np.int64), offset + 12 * count


def parse_keys(data: bytes, num_kv_heads: int, head_dim: int, adjacent_pairs: bool) -> CachedKeys:
    """Every layer's K from a state blob, sorted by position, in half layout."""
    positions, offset = parse_positions(data)
    count = len(positions)
    order = np.argsort(positions, kind="stable")
    if count == 0:
        return CachedKeys(positions, [], GGML_F16)
    _v_trans, n_layer = np.frombuffer(data, np.uint32, 2, offset)
    offset += 8
    keys, key_type = [], GGML_F16
    for _ in range(int(n_layer)):
        key_type = int(np.frombuffer(data, np.int32, 1, offset)[0])
        row_bytes = int(np.frombuffer(data, np.uint64, 1, offset + 4)[0])
        offset += 12
        rows = np.frombuffer(data, np.uint8, count * row_bytes, offset).reshape(count, row_bytes)
        offset += count * row_bytes
        k = dequantize(rows, key_type, num_kv_heads * head_dim)[order]  # [T, kv_heads * head_dim]
        k = k.reshape(count, num_kv_heads, head_dim).transpose(1, 0, 2)
        keys.append(adjacent_to_half(k) if adjacent_pairs else np.ascontiguousarray(k))
    return CachedKeys(positions[order], keys, key_type)


def dequantize(rows: np.ndarray, ggml_type: int, width: int) -> np.ndarray:
    """Raw cache rows [T, bytes] → float32 [T, width]."""
    if ggml_type == GGML_F32:
        return rows.view(np.float32).reshape(len(rows), width)
    if ggml_type == GGML_F16:
        return rows.view(np.float16).reshape(len(rows), width).astype(np.float32)
    if ggml_type == GGML_BF16:
        return (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(len(rows), width)
    if ggml_type == GGML_Q8_0:
        blocks = rows.reshape(len(rows), width // Q8_0_BLOCK, 2 + Q8_0_BLOCK)
        scale = np.ascontiguousarray(blocks[..., :2]).view(np.float16).astype(np.float32)  # [T, nb, 1]
        quants = blocks[..., 2:].view(np.int8).astype(np.float32)  # [T, nb, 32]
        return (scale * quants).reshape(len(rows), width)
    raise RuntimeError(f"K cache type {ggml_type} is not supported (use f32, f16, bf16 or q8_0)")


def adjacent_to_half(x: np.ndarray) -> np.ndarray:
    """Pairs (2f, 2f+1) → (f, f + D/2) along the last axis."""
    return np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """[3, 4, 5, 9, 10] → [(3, 5), (9, 10)]: runs of consecutive integers."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1)
    starts = np.concatenate([[indices[0]], indices[breaks + 1]])
    ends = np.concatenate([indices[breaks], [indices[-1]]])
    return list(zip(starts.tolist(), ends.tolist()))
