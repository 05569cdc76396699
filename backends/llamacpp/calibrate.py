"""Pre-RoPE query statistics of a GGUF model, measured through llama.cpp and written in the shared stats format.

llama.cpp names its graph tensors per layer: the query projection "Qcur-L", after Qwen3's q_norm "Qcur_normed-L",
and the RoPE output "Qcur-L" again. An eval callback (cb_eval) copies every pre-RoPE candidate as it is computed
(RoPE may run in place over its input afterwards), and when the ROPE node of layer L comes, keeps the candidate that
is its input (same data pointer): exactly the query RoPE rotates, after q_norm where the model has one, as the torch
calibration measures it. Queries of Llama GGUFs (adjacent pairs) are put back in HF's half layout first, so the stats
are the same as the HF model's.
"""

from __future__ import annotations

import ctypes
import re
import sys

import llama_cpp as lc
import numpy as np

from ...errors import UserError
from ...calibration import calibration_progress, stats_from_sums
from ...stats.format import QueryStats
from .kvstate import adjacent_to_half

SOURCE = "triattn calibrate (llama.cpp)"
_QUERY_NAME = re.compile(rb"Qcur(_normed)?-(\d+)")
GGML_TYPE_F32 = 0


class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor (ggml.h), read-only here: name, op, shape, strides, data and sources."""

    _fields_ = [
        ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def _ggml():
    """libggml (its dependencies export ggml_op_desc, ggml_nbytes, ggml_backend_tensor_get)."""
    from llama_cpp._ggml import libggml

    libggml.ggml_op_desc.argtypes, libggml.ggml_op_desc.restype = [ctypes.c_void_p], ctypes.c_char_p
    libggml.ggml_nbytes.argtypes, libggml.ggml_nbytes.restype = [ctypes.c_void_p], ctypes.c_size_t
    libggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    libggml.ggml_backend_tensor_get.restype = None
    return libggml


class QueryCapture:
    """Float64 running sums of q_f and |q_f| per (layer, head, f), fed by the eval callback."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, adjacent_pairs: bool):
        self.num_heads, self.head_dim, self.adjacent_pairs = num_heads, head_dim, adjacent_pairs
        f = head_dim // 2
        self.sum_real = np.zeros((num_layers, num_heads, f))
        self.sum_imag = np.zeros((num_layers, num_heads, f))
        self.sum_abs = np.zeros((num_layers, num_heads, f))
        self.tokens = np.zeros(num_layers, dtype=np.int64)
        self.pending: dict[tuple[int, int], np.ndarray] = {}
        self.error: BaseException | None = None
        self.lib = _ggml()
        self.callback = lc.ggml_backend_sched_eval_callback(self._observe)  # kept alive with this object

    def _observe(self, tensor_ptr, ask, _user_data) -> bool:
        try:
            t = ctypes.cast(tensor_ptr, ctypes.POINTER(GgmlTensor)).contents
            match = _QUERY_NAME.fullmatch(t.name)
            if match is None:
                return not ask  # observe nothing else
            if ask:
                return True
            layer = int(match.group(2))
            if self.lib.ggml_op_desc(tensor_ptr) == b"ROPE":
                src = ctypes.cast(t.src[0], ctypes.POINTER(GgmlTensor)).contents
                q = self.pending.pop((layer, src.data), None)
                if q is None:
                    raise RuntimeError(f"layer {layer}: no pre-RoPE query tensor feeds the RoPE")
                self._add(layer, q)
                self.pending = {k: v for k, v in self.pending.items() if k[0] != layer}
            else:
                self.pending[(layer, t.data)] = self._read(tensor_ptr, t)
        except BaseException as e:  # an exception must not cross into C: report it after llama_decode
            self.error = self.error or e
        return True

    def _read(self, tensor_ptr, t: GgmlTensor) -> np.ndarray:
        """The tensor's values as [tokens, heads, head_dim] float32 (views read through their strides)."""
        if t.type != GGML_TYPE_F32:
            raise RuntimeError(f"query tensor {t.name.decode()} is not F32")
        size = self.lib.ggml_nbytes(tensor_ptr)
        buf = np.empty(size, dtype=np.uint8)
        self.lib.ggml_backend_tensor_get(tensor_ptr, buf.ctypes.data, 0, size)
        ne, nb = list(t.ne), list(t.nb)
        values = np.lib.stride_tricks.as_strided(buf.view(np.float32), shape=ne[::-1], strides=nb[::-1])
        return np.ascontiguousarray(values).reshape(-1, self.num_heads, self.head_dim)

    def _add(self, layer: int, q: np.ndarray) -> None:
        q = q.astype(np.float64)
        if self.adjacent_pairs:
            q = adjacent_to_half(q)
        d = self.head_dim // 2
        re, im = q[..., :d], q[..., d:]
        self.sum_real[layer] += re.sum(0)
        self.sum_imag[layer] += im.sum(0)
        self.sum_abs[layer] += np.sqrt(re * re + im * im).sum(0)
        self.tokens[layer] += q.shape[0]


def calibrate(engine, text: str, progress: bool = True, max_tokens: int | None = None,
              chunk_tokens: int = 512) -> QueryStats:
    """Run the text through the model in chunks (one growing KV cache) and return its pre-RoPE query stats."""
    from .engine import LlamaCppRunner

    shape = engine.shape
    ids = engine.tokenizer.encode(text, add_special_tokens=True)[:max_tokens]
    n = len(ids)
    if n == 0:
        raise UserError("calibration text has no tokens")
    capture = QueryCapture(shape.num_layers, shape.num_heads, shape.head_dim, engine.adjacent_pairs)
    runner = LlamaCppRunner(engine, None, n_ctx=n, cb_eval=capture.callback)
    with calibration_progress(progress and sys.stderr.isatty(), n) as advance:
        for start in range(0, n, chunk_tokens):
            chunk = ids[start:start + chunk_tokens]
            runner.forward([chunk], start)
            if capture.error is not None:
                raise RuntimeError(f"query capture failed: {capture.error}") from capture.error
            advance(len(chunk))
    del runner
    bad = [i for i, count in enumerate(capture.tokens) if count != n]
    if bad:
        raise RuntimeError(f"layers {bad}: captured queries of {capture.tokens[bad].tolist()} tokens, expected {n}")
    return stats_from_sums(shape, engine.model_id, text, n, capture.sum_real, capture.sum_imag, capture.sum_abs,
                           source=SOURCE)
