"""The MLX backend: Hugging Face-format model directories and mlx-community (quantized) models through mlx-lm.

Apple Silicon (Metal) first; the same code runs on MLX's CPU and CUDA builds. The model is mlx-lm's own; its
attention reads and writes a TriAttentionKVCache per layer (cache.py), at explicit positions, so the shared loop in
engine.Session (chunked prefill, rounds, sampling, stop, streaming) drives it like the torch backend.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from ...engine import Engine, SequenceRunner
from ...errors import UserError
from ...methods import KeyScorer
from ...rope import ModelShape
from .cache import TriAttentionKVCache, make_prompt_cache
from .methods import check_scorer, layer_head_scores

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# transformers' defaults for these architectures, for config.json files that leave them out (mlx-lm needs them, and
# its own default for tie_word_embeddings differs, which would make it run a different model than torch).
CONFIG_DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def pick_device(device: str):
    """The MLX device to run on: its default (Metal GPU, CUDA GPU or CPU, by build), or the one asked for."""
    if device == "auto":
        return mx.default_device()
    if device == "cpu":
        return mx.cpu
    if device == "cuda":
        cuda = getattr(mx, "cuda", None)
        if cuda is None or not cuda.is_available():
            raise UserError("--device cuda: this MLX build has no CUDA device (pip install 'mlx[cuda]')")
        return mx.gpu
    raise UserError(f"unknown device {device!r} (choose auto, cpu or cuda)")


def last_logits(model, ids: mx.array, cache: list) -> mx.array:
    """Logits [B, vocab] of the last token only (no lm_head over a whole prefill chunk), for the supported
    architectures' mlx-lm Model: decoder, then lm_head or the tied embedding."""
    hidden = model.model(ids, cache)[:, -1:, :]
    if model.args.tie_word_embeddings:
        return model.model.embed_tokens.as_linear(hidden)[:, 0]
    return model.lm_head(hidden)[:, 0]


class MLXRunner:
    """A batch of sequences in lockstep (engine.ModelRunner): one TriAttentionKVCache per layer holding [B, Hkv, T, D]
    and mlx-lm's forward at explicit positions. The batch size is set by the first forward after reset."""

    def __init__(self, engine: "MLXEngine", scorer: KeyScorer | None = None, capacity: int | None = None):
        self.engine = engine
        self.scorer = check_scorer(scorer)
        self.capacity = capacity
        self.device_logits = False  # engine.keep_logits_on_device turns it on for loops that sample with Sampler
        self.reset()

    def reset(self) -> None:
        e = self.engine
        self.caches = [TriAttentionKVCache(i, None, e.kv_bits, e.kv_group_size, self.capacity)
                       for i in range(e.shape.num_layers)]

    def forward(self, token_ids, start_position: int) -> np.ndarray:
        ids = mx.array(np.asarray(token_ids, dtype=np.int32))  # [B, n]
        for cache in self.caches:
            cache.offset = start_position  # mlx-lm rotates queries and keys from cache.offset
        with mx.stream(self.engine.device):
            logits = last_logits(self.engine.model, ids, self.caches).astype(mx.float32)
            self._eval(logits)
            if self.device_logits:  # Sampler draws where MLX keeps them: only token ids go to the host
                return logits
            return np.array(logits)  # [B, vocab]: one copy to the host per step

    def head_scores(self, scorer: KeyScorer, round_start: int) -> np.ndarray:
        with mx.stream(self.engine.device):
            return layer_head_scores([c.scoring_keys() for c in self.caches], scorer, round_start)

    def compact(self, keep: np.ndarray) -> None:
        keep = mx.array(np.asarray(keep, dtype=np.int32))  # [B, layers, kv_heads, K]
        with mx.stream(self.engine.device):
            for i, cache in enumerate(self.caches):
                cache.compact(keep[:, i])
            self._eval()

    def select_rows(self, rows: list[int]) -> None:
        idx = mx.array(np.asarray(rows, dtype=np.int32))
        with mx.stream(self.engine.device):
            for cache in self.caches:
                cache.select_rows(idx)
            self._eval()

    def save(self) -> list[tuple]:
        """The stored K/V of every layer (prefix reuse). MLX arrays are values: later appends to the cache make new
        arrays and leave these as they are."""
        saved = [(c.state, c.length, c.offset) for c in self.caches]
        self._eval()
        return saved

    def load(self, saved: list[tuple]) -> None:
        self.reset()
        for cache, (state, length, offset) in zip(self.caches, saved):
            cache.state = state
            cache.length, cache.offset = length, offset
        self._eval()

    def _eval(self, *arrays) -> None:
        """Evaluate the caches now (with what else is due): a lazy MLX array can only be evaluated by the thread that
        made it, and a server or chat may run the next step of this runner in another thread."""
        mx.eval(*arrays, [c.state for c in self.caches])


class MLXSequenceRunner(SequenceRunner):
    """One sequence (what Session uses), plus its per-layer caches for inspection."""

    @property
    def caches(self) -> list[TriAttentionKVCache]:
        return self.runner.caches


class MLXEngine(Engine):
    backend = "mlx"

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto", kv_bits: int | None = None,
                 kv_group_size: int = 64):
        """kv_bits (4 or 8, None = full precision): store K/V quantized as mlx-lm's QuantizedKVCache does."""
        import mlx_lm

        path = Path(model_path)
        if not path.exists():  # registry names and repos are pulled first (`triattn pull`); see registry.py
            raise UserError(f"{model_path}: no such model directory")
        self.shape = ModelShape.from_model_dir(path)
        config = json.loads((path / "config.json").read_text())
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(f"{model_path}: model type {model_type!r} is not supported by the mlx backend "
                            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if config.get("rope_traditional") or (config.get("sliding_window") and config.get("use_sliding_window")):
            raise UserError(f"{model_path}: interleaved RoPE or sliding-window attention is not supported")
        if dtype != "auto" and dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r} (choose auto, {', '.join(DTYPES)})")
        self.device = pick_device(device)
        defaults = {k: v for k, v in CONFIG_DEFAULTS.items() if k not in config}
        try:
            self.model, wrapper = mlx_lm.load(str(path), model_config=defaults)
        except (OSError, ValueError, FileNotFoundError) as e:
            raise UserError(f"{model_path}: cannot load the model ({str(e).splitlines()[0]})") from None
        if dtype == "auto" and self.device == mx.cpu:
            dtype = "float32"  # as the torch backend: bf16/fp16 arithmetic is slow and lossy on a CPU
        if dtype != "auto":
            self.model.set_dtype(DTYPES[dtype])  # floating parameters only: quantized weights stay as they are
            mx.eval(self.model.parameters())  # lazy arrays belong to this thread; a server generates in another
        self.tokenizer = wrapper._tokenizer  # the Hugging Face tokenizer (what Engine and Session expect)
        self.model_id = str(model_path)
        self.model_path = path
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        s = self.shape
        act_bytes = self.model.model.norm.weight.dtype.size  # the activation dtype (norms are never quantized)
        per_head = 2 * s.head_dim * act_bytes
        if kv_bits is not None:  # packed values + a scale and a bias per group
            per_head = 2 * (s.head_dim * kv_bits // 8 + 2 * (s.head_dim // kv_group_size) * act_bytes)
        self.kv_bytes_per_token = s.num_layers * s.num_kv_heads * per_head
        self.context_length = s.max_position_embeddings

    def new_runner(self, scorer: KeyScorer | None = None, capacity: int | None = None) -> MLXRunner:
        return MLXRunner(self, scorer, capacity)

    def new_sequence_runner(self, scorer: KeyScorer | None = None, capacity: int | None = None) -> MLXSequenceRunner:
        return MLXSequenceRunner(self.new_runner(scorer, capacity))

    def make_prompt_cache(self, compression, prompt_len: int = 0) -> list[TriAttentionKVCache]:
        """A self-compressing cache for mlx-lm's own generate_step / stream_generate (see cache.make_prompt_cache;
        pass them prefill_step_size=compression.policy.divide_length)."""
        return make_prompt_cache(self.shape, compression, prompt_len, self.kv_bits, self.kv_group_size)

    def calibrate(self, text: str, progress: bool = True, max_tokens: int | None = None):
        from .calibrate import calibrate

        with mx.stream(self.device):
            return calibrate(self.model, self.tokenizer, self.shape, text, model_id=self.model_id,
                             max_tokens=max_tokens, progress=progress)
