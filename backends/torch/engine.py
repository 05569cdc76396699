"""The PyTorch backend: Hugging Face-format models through transformers, on CPU or CUDA."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from ...engine import CompressionSettings, Engine, SequenceRunner, resolve_pruning_mode
from ...errors import UserError
from ...methods import BaselineScorer, KeyScorer, make_scorer
from ...rope import ModelShape
from ...scorer import TriAttentionScorer
from .cache import TriAttentionCache
from .methods import RECORDER_KWARG, RECORDING, AttentionRecorder, RecorderRow, baseline_head_scores, enable_capture

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to torch")
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown device {device!r} (choose auto, cpu or cuda)")
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (choose auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


class TorchRunner:
    """A batch of sequences in lockstep (engine.ModelRunner): a TriAttentionCache [B, Hkv, T, D] and the model forward
    at explicit positions, plus, for the attention-based baselines, a recorder of the queries (or attention) they
    score with. The batch size is set by the first forward after reset and shrinks with select_rows."""

    def __init__(self, engine: "TorchEngine", scorer: KeyScorer | None = None):
        self.engine = engine
        self.recorder: AttentionRecorder | None = None
        self.device_logits = False  # engine.keep_logits_on_device turns it on for loops that sample with Sampler
        if isinstance(scorer, BaselineScorer) and scorer.method in RECORDING:
            enable_capture(engine.model)
            self.recorder = AttentionRecorder(scorer, engine.shape.num_layers)
        self.reset()

    def reset(self) -> None:
        self.cache = TriAttentionCache(config=self.engine.model.config)
        if self.recorder is not None:
            self.recorder.reset()

    @torch.inference_mode()
    def forward(self, token_ids, start_position: int) -> np.ndarray:
        device = self.engine.device
        ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64), device=device)  # [B, n]
        batch, n = ids.shape
        positions = torch.arange(start_position, start_position + n, device=device).expand(batch, n)
        record = {RECORDER_KWARG: self.recorder} if self.recorder is not None else {}
        cache = {self.engine.cache_kwarg: self.cache}
        out = self.engine.model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1, **cache,
                                **record)
        logits = out.logits[:, -1].float()  # [B, vocab]
        if self.device_logits and logits.device.type == "cuda":  # sampled there: only token ids go to the host
            return logits
        return logits.cpu().numpy()

    @torch.inference_mode()
    def head_scores(self, scorer: KeyScorer, round_start: int) -> np.ndarray:
        if isinstance(scorer, BaselineScorer):
            return baseline_head_scores(scorer, self.cache, self.recorder)
        return self.cache.head_scores(scorer, round_start)

    @torch.inference_mode()
    def compact(self, keep: np.ndarray) -> None:
        keep = torch.as_tensor(keep, device=self.engine.device)  # [B, layers, kv_heads, K]
        self.cache.compact(keep)
        if self.recorder is not None:
            self.recorder.compact(keep)

    @torch.inference_mode()
    def select_rows(self, rows: list[int]) -> None:
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.engine.device)
        self.cache.batch_select_indices(idx)
        if self.recorder is not None:
            self.recorder.select_rows(idx)

    def save(self) -> TriAttentionCache | None:
        """A copy of the cache (prefix reuse); None with a recorder, whose query history is not copied."""
        return None if self.recorder is not None else copy.deepcopy(self.cache)

    def load(self, saved: TriAttentionCache) -> None:
        self.cache = copy.deepcopy(saved)


class TorchSequenceRunner(SequenceRunner):
    """One sequence (what Session uses): a TorchRunner with a batch of one, plus views of its cache (K/V
    [1, Hkv, T, D]) and of its recorder's row, for inspection."""

    @property
    def cache(self) -> TriAttentionCache:
        return self.runner.cache

    @property
    def recorder(self) -> RecorderRow | None:
        return None if self.runner.recorder is None else self.runner.recorder.row(0)


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto", static_cache: bool | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own output stays one stream of text and one summary line

        path = Path(model_path)
        if not path.exists():
            raise UserError(f"{model_path}: no such model directory")
        self.shape = ModelShape.from_model_dir(path)
        config = json.loads((path / "config.json").read_text())
        archs = config.get("architectures") or []
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise UserError(f"{model_path}: architecture {archs} is not supported by the torch backend "
                            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        quant = config.get("quantization_config") or {}
        # AWQ int4 checkpoints (e.g. Qwen/Qwen3-32B-AWQ): transformers cannot load them without extra packages, so
        # they load straight into the static-cache model, which serves TriAttention and full attention.
        self.awq = str(quant.get("quant_method", "")).lower() == "awq"
        self.model = None  # the transformers model (None for an AWQ checkpoint)
        self._static_model = None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            if self.awq:
                self._static_model = self._load_awq(path)
            else:
                self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=self.dtype).to(self.device).eval()
        except (OSError, ValueError, ImportError) as e:  # ImportError: a quantization that needs another package
            raise UserError(f"{model_path}: cannot load the model ({_first_line(e)})") from None
        from .calibrate import _cache_kwarg

        # an older transformers would silently ignore `cache=`
        self.cache_kwarg = None if self.model is None else _cache_kwarg(self.model)
        self.model_id = str(path)
        self.model_path = path
        s = self.shape
        self.kv_bytes_per_token = 2 * s.num_layers * s.num_kv_heads * s.head_dim * torch.finfo(self.dtype).bits // 8
        self.context_length = s.max_position_embeddings
        # The bounded static cache + CUDA graph path serves TriAttention on CUDA; transformers' DynamicCache the rest.
        self.static_cache = self.awq or (self.device == "cuda" if static_cache is None else static_cache)

    def _load_awq(self, path: Path):
        from .static_model import StaticKVModel

        try:
            model = StaticKVModel.from_pretrained(path, self.device, self.dtype)
        except ValueError as e:  # unsupported quantization (not 4-bit GEMM), weights that do not match the config
            raise UserError(f"{path}: {_first_line(e)}") from None
        except (RuntimeError, TypeError) as e:  # e.g. a dtype or a size this device cannot take
            raise UserError(f"{path}: cannot load the AWQ model on {self.device} in {str(self.dtype)[6:]} "
                            f"({_first_line(e)})") from None
        return model

    def static_model(self):
        """The model as a StaticKVModel (same weight tensors as the transformers model), built on first use; an AWQ
        checkpoint is loaded as one."""
        if self._static_model is None:
            from .static_model import StaticKVModel

            self._static_model = StaticKVModel.from_hf(self.model)
        return self._static_model

    def new_runner(self, scorer: KeyScorer | None = None, capacity: int | None = None):
        """A runner. With the static path on (CUDA, or an AWQ model, which has only that path): TriAttention with a
        known capacity (B + N) gets the bounded-cache runner, full attention (no scorer) the same runner with a cache
        that grows, so `--no-compress` is measured on the same fast path. The baselines run on transformers."""
        triattention = isinstance(scorer, TriAttentionScorer) and scorer.offset_aggregation == "mean"
        if self.awq and not (scorer is None or triattention):
            what = (f"{scorer.method}" if isinstance(scorer, BaselineScorer)
                    else f"TriAttention with {scorer.offset_aggregation} offset aggregation")
            raise UserError(f"{self.model_id}: {what} needs the transformers path, which cannot load AWQ "
                            "checkpoints; this model runs TriAttention (the default) or full attention (--no-compress)")
        if self.awq or (self.static_cache and (scorer is None or (capacity and triattention))):
            from .static_runner import StaticRunner

            return StaticRunner(self.static_model(), capacity if triattention else None)
        return TorchRunner(self, scorer)

    def new_row_batch(self, compression: CompressionSettings, rows: int, kv_memory: int | None = None,
                      reserve: int = 0):
        """Continuous batching on the static cache (CUDA, or static_cache on): as many rows as kv_memory bytes
        hold (default: 85 % of the free GPU memory less `reserve`; on a CPU, `rows`), at most `rows`. A row holds
        B + N slots with TriAttention; with full attention it holds the whole context (prompt + answer never
        exceed it), so far fewer rows fit. None for the baselines and the transformers path."""
        from .row_batch import RowBatch, row_bytes, rows_that_fit

        if not self.static_cache:
            return None
        if compression.enabled:
            compression = resolve_pruning_mode(self, compression)
            scorer = make_scorer(compression, self.shape)
            if not isinstance(scorer, TriAttentionScorer) or scorer.offset_aggregation != "mean":
                return None
            capacity = compression.policy.capacity
        else:
            capacity = self.context_length
        model = self.static_model()
        per_row = row_bytes(model, capacity)
        if kv_memory is None and self.device == "cuda":
            kv_memory = int(torch.cuda.mem_get_info()[0] * 0.85) - reserve
        if not compression.enabled and kv_memory is not None and kv_memory < 3 * per_row:
            return None  # not two whole contexts and the scratch row: requests grow their own caches in turn instead
        fit = rows if kv_memory is None else rows_that_fit(per_row, kv_memory - per_row, rows)  # + the scratch row
        return RowBatch(model, fit, capacity)

    def new_sequence_runner(self, scorer: KeyScorer | None = None, capacity: int | None = None) -> SequenceRunner:
        runner = self.new_runner(scorer, capacity)
        return TorchSequenceRunner(runner) if isinstance(runner, TorchRunner) else SequenceRunner(runner)

    def calibrate(self, text: str, progress: bool = True, max_tokens: int | None = None):
        from .calibrate import calibrate

        model = self.static_model() if self.awq else self.model
        return calibrate(model, self.tokenizer, text, model_id=self.model_id, max_tokens=max_tokens,
                         progress=progress)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
