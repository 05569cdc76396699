"""The llama.cpp backend: GGUF models through llama-cpp-python's low-level API (llama_batch / llama_decode).

Each session owns one llama_context with one sequence. Its KV cache has n_ctx cells: B + N with compression
(llama.cpp rounds n_ctx up to a multiple of 256), so memory is really bounded however long the model thinks; the
engine's n_ctx without. Every token is decoded at its original position. A compression round reads the cached
post-RoPE keys back (llama_state_seq_get_data, kvstate.py), scores them with the shared TriAttentionScorer, lets the
shared policy choose, and removes the other cells with llama_memory_seq_rm over runs of positions. The kept cells
keep their positions (nothing is re-rotated or shifted), and the next token goes at newest + 1, as llama.cpp wants.

Limit: a llama.cpp cell holds one token's K/V for every layer and head, so a round can keep only one set of
positions for the whole cache: pruning mode "global" (scores z-normalised per (layer, KV head), then averaged).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import weakref
from pathlib import Path

import llama_cpp as lc
import numpy as np

from ...engine import CompressionSettings, Engine, SequenceRunner, Session
from ...errors import UserError
from ...methods import BaselineScorer, KeyScorer, streaming_slot_scores
from ...stats_cache import STATS_FILE_NAME
from . import gguf_file
from .gguf_meta import model_shape, read_header
from .kvstate import (GGML_Q8_0, TYPE_NAMES, CachedKeys, bytes_per_value, parse_keys, parse_positions, read_state,
                      runs)
from .tokenizer import LlamaCppTokenizer

METHODS = ("triattention", "streaming")  # the baselines that need attention weights are not recorded here
DTYPES = {"auto": "f16", "float16": "f16", "float32": "f32", "bfloat16": "bf16", "f16": "f16", "f32": "f32",
          "bf16": "bf16", "q8_0": "q8_0"}
LLAMA_ROPE_TYPE_NORM, LLAMA_ROPE_TYPE_NEOX = 0, 2
DEFAULT_N_CTX = 32768  # cells of a full-attention context (capped by the model's training context)
MAX_BATCH = 512
GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT = 4, 5  # ggml.h

_init_lock = threading.Lock()
_initialised = False
_last_level = [0]  # the level a GGML_LOG_LEVEL_CONT line continues


@lc.llama_log_callback
def _log(level: int, text: bytes, _user_data) -> None:
    """llama.cpp's log: errors only (it logs every tensor load and context setting), everything with TRIATTN_DEBUG."""
    if level != GGML_LOG_LEVEL_CONT:
        _last_level[0] = level
    if _last_level[0] == GGML_LOG_LEVEL_ERROR or os.environ.get("TRIATTN_DEBUG"):
        sys.stderr.write(text.decode("utf-8", "replace"))


def _init_llama() -> None:
    """Initialise llama.cpp once, with our log callback."""
    global _initialised
    with _init_lock:
        if not _initialised:
            lc.llama_log_set(_log, ctypes.c_void_p(0))
            lc.llama_backend_init()
            _initialised = True


def kv_cache_type(dtype: str) -> int:
    """--dtype on this backend names the KV cache type (the weights are whatever the GGUF holds)."""
    if dtype not in DTYPES:
        raise UserError(f"unknown KV cache type {dtype!r} for the llamacpp backend "
                        "(choose auto, float16, float32, bfloat16 or q8_0)")
    return TYPE_NAMES[DTYPES[dtype]]


def default_threads() -> int:
    """$TRIATTN_THREADS, else half the logical CPUs (about the physical cores): ggml's threads spin while they wait,
    so more threads than free cores makes decoding many times slower, not faster."""
    if os.environ.get("TRIATTN_THREADS"):
        return max(1, int(os.environ["TRIATTN_THREADS"]))
    return max(1, (os.cpu_count() or 2) // 2)


def check_settings(compression: CompressionSettings) -> None:
    """What this backend can do, refused in one line before any work."""
    if not compression.enabled:
        return
    policy = compression.policy
    if policy.pruning_mode not in ("global", "auto"):  # auto becomes global here (Engine.default_pruning_mode)
        raise UserError(f"the llamacpp backend supports only --pruning-mode global (got {policy.pruning_mode}): a "
                        "llama.cpp KV cell holds a token for every layer and head, so one set of positions is kept")
    if policy.window < 1:
        raise UserError("the llamacpp backend needs --window of at least 1: llama.cpp requires the newest token to "
                        "stay cached")
    if compression.method not in METHODS:
        raise UserError(f"method {compression.method} is not available on the llamacpp backend "
                        f"(choose {' or '.join(METHODS)})")


class LlamaCppRunner:
    """One sequence in its own llama_context (engine.ModelRunner with a batch of one). `positions` are the cached
    cells' positions in ascending order: the slot order of the core's CompressionState."""

    def __init__(self, engine: "LlamaCppEngine", scorer: KeyScorer | None, n_ctx: int, cb_eval=None):
        self.engine = engine
        self.scorer = scorer
        self.ctx = engine.new_context(n_ctx, cb_eval)
        self.n_ctx = lc.llama_n_ctx(self.ctx)
        self.n_batch = lc.llama_n_batch(self.ctx)
        self.batch = lc.llama_batch_init(self.n_batch, 0, 1)
        self.memory = lc.llama_get_memory(self.ctx)
        self._finalizer = weakref.finalize(self, _free_context, self.ctx, self.batch)
        self.reset()

    def reset(self) -> None:
        lc.llama_memory_clear(self.memory, True)
        self.positions = np.zeros(0, dtype=np.int64)
        self.next_position = 0

    def forward(self, token_ids, start_position: int) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise UserError("the llamacpp backend runs one sequence at a time (batch of 1)")
        ids = ids[0]
        if start_position != self.next_position:
            raise RuntimeError(f"llama.cpp needs consecutive positions: next is {self.next_position}, "
                               f"got {start_position}")
        for i in range(0, len(ids), self.n_batch):
            chunk = ids[i:i + self.n_batch]
            self._decode(chunk, start_position + i, logits=i + len(chunk) == len(ids))
            self.positions = np.concatenate([self.positions, np.arange(start_position + i,
                                                                       start_position + i + len(chunk))])
        self.next_position = start_position + len(ids)
        out = lc.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(out, shape=(self.engine.n_vocab,)).copy()[None]

    def _decode(self, tokens: np.ndarray, start: int, logits: bool) -> None:
        b = self.batch
        n = len(tokens)
        b.n_tokens = n
        for j, token in enumerate(tokens.tolist()):
            b.token[j] = token
            b.pos[j] = start + j
            b.n_seq_id[j] = 1
            b.seq_id[j][0] = 0
            b.logits[j] = 0
        b.logits[n - 1] = 1 if logits else 0
        rc = lc.llama_decode(self.ctx, b)
        if rc == 1:
            raise UserError(f"the llama.cpp KV cache is full ({self.n_ctx} cells, {len(self.positions)} used): "
                            "use compression or a larger context")
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    # -- compression --
    def read_keys(self) -> CachedKeys:
        """Every layer's cached keys as llama.cpp holds them, by position, in HF's half pair layout."""
        e = self.engine
        return parse_keys(read_state(self.ctx), e.shape.num_kv_heads, e.shape.head_dim, e.adjacent_pairs)

    def cells(self) -> np.ndarray:
        """Positions of the cells llama.cpp holds for this sequence, ascending (read back, not tracked)."""
        return np.sort(parse_positions(read_state(self.ctx))[0])

    def head_scores(self, scorer: KeyScorer, round_start: int) -> np.ndarray:
        cached = self.read_keys()
        if not np.array_equal(cached.positions, self.positions):
            raise RuntimeError("llama.cpp's cached positions differ from the ones this runner placed")
        shape = self.engine.shape
        if isinstance(scorer, BaselineScorer):  # streaming: its sinks and the newest tokens
            t = len(self.positions)
            return np.broadcast_to(streaming_slot_scores(t), (1, shape.num_layers, shape.num_heads, t)).copy()
        scores = [scorer.head_scores(layer, keys, round_start) for layer, keys in enumerate(cached.keys)]
        return np.stack(scores)[None]  # [1, layers, heads, T]

    def compact(self, keep: np.ndarray) -> None:
        """Keep slots keep[0, layer, kv_head, :], the same for every layer and head (global mode); remove the other
        cells with llama_memory_seq_rm, one call per run of consecutive dropped slots."""
        keep = np.asarray(keep)[0]
        slots = keep[0, 0]
        if not (keep == slots).all():
            raise UserError("the llamacpp backend can keep only one set of positions for all layers and heads "
                            "(--pruning-mode global)")
        if len(self.positions) - 1 not in slots:
            raise RuntimeError("a round may not drop the newest token: llama.cpp continues from it")
        dropped = np.ones(len(self.positions), dtype=bool)
        dropped[slots] = False
        for first, last in runs(np.flatnonzero(dropped)):
            if not lc.llama_memory_seq_rm(self.memory, 0, int(self.positions[first]), int(self.positions[last]) + 1):
                raise RuntimeError("llama_memory_seq_rm refused to remove cells")
        self.positions = self.positions[slots]

    def save(self) -> tuple[bytes, np.ndarray, int]:
        """The sequence's serialised K/V and cell positions (prefix reuse)."""
        return read_state(self.ctx), self.positions.copy(), self.next_position

    def load(self, saved: tuple[bytes, np.ndarray, int]) -> None:
        data, positions, next_position = saved
        self.reset()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if lc.llama_state_seq_set_data(self.ctx, buf, len(data), 0) != len(data):
            raise RuntimeError("llama.cpp refused a saved sequence state")
        self.positions, self.next_position = positions.copy(), next_position

    def select_rows(self, rows: list[int]) -> None:
        if list(rows) == [0]:
            return
        if len(rows) == 0:
            self.reset()
            return
        raise UserError("the llamacpp backend runs one sequence at a time (batch of 1)")


def _free_context(ctx, batch) -> None:
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)


class LlamaCppSequenceRunner(SequenceRunner):
    """One sequence (what Session uses), plus what tests and tools inspect: cells read back from llama.cpp."""

    @property
    def n_ctx(self) -> int:
        return self.runner.n_ctx

    def cells(self) -> np.ndarray:
        return self.runner.cells()

    def read_keys(self) -> CachedKeys:
        return self.runner.read_keys()


class LlamaCppEngine(Engine):
    backend = "llamacpp"
    pruning_modes = ("global",)
    methods = METHODS

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto", n_ctx: int | None = None,
                 n_threads: int | None = None):
        path = Path(model_path)
        if not path.exists():
            raise UserError(f"{model_path}: no such model file or directory")
        gguf = gguf_file(path)
        if gguf is None:
            raise UserError(f"{model_path}: no .gguf file (convert a Hugging Face model with `triattn convert`)")
        self.gguf_path = gguf
        header = read_header(gguf)
        self.shape = model_shape(header)
        self.kv_type = kv_cache_type(dtype)
        self.n_threads = n_threads or default_threads()
        _init_llama()
        params = lc.llama_model_default_params()
        params.n_gpu_layers = _gpu_layers(device)
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), params)
        if not self.model:
            raise UserError(f"{gguf}: llama.cpp cannot load this model")
        self._finalizer = weakref.finalize(self, lc.llama_model_free, self.model)
        rope = lc.llama_model_rope_type(self.model)
        if rope not in (LLAMA_ROPE_TYPE_NORM, LLAMA_ROPE_TYPE_NEOX) or lc.llama_model_is_recurrent(self.model):
            raise UserError(f"{gguf}: this architecture's attention is not supported by the llamacpp backend")
        self.adjacent_pairs = rope == LLAMA_ROPE_TYPE_NORM  # Llama GGUFs: pairs (2f, 2f+1); Qwen: (f, f + D/2)
        s = self.shape
        got = (lc.llama_model_n_layer(self.model), lc.llama_model_n_head(self.model),
               lc.llama_model_n_head_kv(self.model))
        if got != (s.num_layers, s.num_heads, s.num_kv_heads):
            raise UserError(f"{gguf}: header and llama.cpp disagree on the attention shape ({got})")
        vocab = lc.llama_model_get_vocab(self.model)
        self.tokenizer = LlamaCppTokenizer(vocab, header.metadata.get("tokenizer.chat_template"))
        self.n_vocab = self.tokenizer.vocab_size
        self._eos = self.tokenizer.eog_token_ids()
        self.model_id = str(path)
        # stats are looked for next to model_path (stats_cache.find_stats): a GGUF file's folder may hold them
        beside = path.is_file() and (path.parent / STATS_FILE_NAME).is_file()
        self.model_path = path.parent if beside else path
        self.kv_bytes_per_token = int(2 * s.num_layers * s.num_kv_heads * s.head_dim * bytes_per_value(self.kv_type))
        self.context_length = lc.llama_model_n_ctx_train(self.model)
        self.n_ctx = n_ctx or min(self.context_length or DEFAULT_N_CTX, DEFAULT_N_CTX)

    def eos_token_ids(self) -> set[int]:
        return set(self._eos)

    def new_context(self, n_ctx: int, cb_eval=None):
        """A llama_context of n_ctx cells (one sequence) with this engine's KV type; cb_eval observes tensors."""
        p = lc.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = p.n_ubatch = min(MAX_BATCH, n_ctx)
        p.n_seq_max = 1
        p.n_threads = p.n_threads_batch = self.n_threads
        p.type_k = p.type_v = self.kv_type
        quantized = self.kv_type == GGML_Q8_0  # a quantized V cache needs flash attention; otherwise llama.cpp chooses
        p.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if quantized else lc.LLAMA_FLASH_ATTN_TYPE_AUTO
        p.no_perf = True
        if cb_eval is not None:
            p.cb_eval = cb_eval
        ctx = lc.llama_init_from_model(self.model, p)
        if not ctx:
            raise UserError(f"llama.cpp cannot create a context of {n_ctx} tokens for {self.gguf_path}")
        return ctx

    def session(self, compression: CompressionSettings | None = None, runner=None) -> Session:
        """A session, after refusing in one line what this backend cannot do (see check_settings)."""
        compression = compression or CompressionSettings(policy=None)
        check_settings(compression)
        return super().session(compression, runner)

    def new_runner(self, scorer: KeyScorer | None = None, n_ctx: int | None = None) -> LlamaCppRunner:
        return LlamaCppRunner(self, scorer, n_ctx or self.n_ctx)

    def new_sequence_runner(self, scorer: KeyScorer | None = None,
                            capacity: int | None = None) -> LlamaCppSequenceRunner:
        """One sequence whose llama_context holds `capacity` cells (B + N with compression), else the engine's n_ctx."""
        return LlamaCppSequenceRunner(self.new_runner(scorer, capacity))

    def calibrate(self, text: str, progress: bool = True, max_tokens: int | None = None):
        from .calibrate import calibrate

        return calibrate(self, text, progress=progress, max_tokens=max_tokens)


def _gpu_layers(device: str) -> int:
    """Layers to offload: all on a GPU build (HIP, CUDA, Metal, Vulkan) unless --device cpu."""
    if device == "cpu":
        return 0
    if device not in ("auto", "cuda", "gpu"):
        raise UserError(f"unknown device {device!r} for the llamacpp backend (choose auto, cpu or gpu)")
    if lc.llama_supports_gpu_offload():
        return 999
    if device != "auto":
        raise UserError("this llama-cpp-python build has no GPU support (rebuild it, e.g. "
                        "CMAKE_ARGS=\"-DGGML_HIP=on\" pip install --force-reinstall --no-cache-dir llama-cpp-python)")
    return 0
