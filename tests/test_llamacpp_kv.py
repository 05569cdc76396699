"""The llama.cpp backend's numpy parts, without llama.cpp: reading a serialised KV state, the cache types, the RoPE
pair layouts and the runs of positions a round removes."""

import struct

import numpy as np

from triattn_local.backends.llamacpp.kvstate import (
    GGML_BF16, GGML_F16, GGML_F32, GGML_Q8_0, adjacent_to_half, dequantize, parse_keys, parse_positions,
)
from triattn_local.rope import to_complex_pairs


def encode(values: np.ndarray, ggml_type: int) -> np.ndarray:
    """float32 [T, W] → raw cache rows [T, bytes], as llama.cpp stores them."""
    if ggml_type == GGML_F32:
        return values.astype(np.float32).view(np.uint8)
    if ggml_type == GGML_F16:
        return values.astype(np.float16).view(np.uint8)
    if ggml_type == GGML_BF16:
        return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    blocks = values.reshape(len(values), -1, 32)
    scale = np.abs(blocks).max(-1, keepdims=True) / 127
    quants = np.round(blocks / np.where(scale == 0, 1, scale)).astype(np.int8)
    raw = np.concatenate([scale.astype(np.float16).view(np.uint8), quants.view(np.uint8)], axis=-1)
    return raw.reshape(len(values), -1)


def state_blob(positions, layers_rows, ggml_type) -> bytes:
    """A llama_state_seq_get_data blob: one stream, its cells (pos, one seq id), then each layer's K rows."""
    out = struct.pack("<IiII", 0xAF143CD8, 0, 1, len(positions))  # magic, seq_id, one stream, its cells
    for p in positions:
        out += struct.pack("<iIi", p, 1, 0)
    out += struct.pack("<II", 0, len(layers_rows))
    for rows in layers_rows:
        out += struct.pack("<iQ", ggml_type, rows.shape[1]) + rows.tobytes()
    return out + b"V data the parser never reads"


def test_cache_types_dequantize():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 128)).astype(np.float32)
    np.testing.assert_array_equal(dequantize(encode(x, GGML_F32), GGML_F32, 128), x)
    f16 = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(dequantize(encode(x, GGML_F16), GGML_F16, 128), f16)
    bf16 = (x.view(np.uint32) & 0xFFFF0000).view(np.float32)  # exactly representable in bf16
    np.testing.assert_array_equal(dequantize(encode(bf16, GGML_BF16), GGML_BF16, 128), bf16)
    q8 = dequantize(encode(x, GGML_Q8_0), GGML_Q8_0, 128)
    assert np.abs(q8 - x).max() <= np.abs(x).max() / 127  # within one quantisation step
    assert not np.array_equal(q8, x)


def test_state_blob_gives_keys_by_position_in_half_layout():
    """Cells come in cell order (after evictions new tokens fill freed cells); keys come out sorted by position,
    [kv_heads, T, head_dim] per layer, and adjacent-pair (Llama GGUF) keys are put in HF's half layout."""
    kv_heads, head_dim = 2, 64
    positions = [40, 41, 3, 0, 17]
    rng = np.random.default_rng(1)
    half = [rng.normal(size=(len(positions), kv_heads, head_dim)).astype(np.float32) for _ in range(3)]  # HF layout
    adjacent = [np.empty_like(k) for k in half]
    for a, h in zip(adjacent, half):  # what the converter's permutation makes of each head's dims
        a[..., 0::2], a[..., 1::2] = h[..., :32], h[..., 32:]
    blob = state_blob(positions, [encode(k.reshape(len(positions), -1), GGML_F32) for k in adjacent], GGML_F32)
    got = parse_keys(blob, kv_heads, head_dim, adjacent_pairs=True)
    order = np.argsort(positions)
    assert got.positions.tolist() == [0, 3, 17, 40, 41] and got.key_type == GGML_F32
    for layer in range(3):
        np.testing.assert_array_equal(got.keys[layer], half[layer][order].transpose(1, 0, 2))
    assert sorted(parse_positions(blob)[0].tolist()) == [0, 3, 17, 40, 41]


def test_adjacent_pairs_are_the_same_complex_numbers():
    rng = np.random.default_rng(2)
    k = rng.normal(size=(3, 7, 64))
    np.testing.assert_array_equal(to_complex_pairs(adjacent_to_half(k), "half"), to_complex_pairs(k, "interleaved"))


def test_runs_of_dropped_slots():
    from triattn_local.backends.llamacpp.kvstate import runs

    assert runs(np.array([3, 4, 5, 9, 10, 12])) == [(3, 5), (9, 10), (12, 12)]
    assert runs(np.array([], dtype=np.int64)) == []
