"""The PyTorch backend: Hugging Face-format models through transformers, on CPU or CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ...engine import Engine
from ...errors import UserError
from ...methods import BaselineScorer, KeyScorer
from ...rope import ModelShape
from .cache import TriAttentionCache
from .methods import RECORDER_KWARG, RECORDING, AttentionRecorder, baseline_head_scores, enable_capture

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
    """One sequence: a TriAttentionCache and the model forward at explicit positions, plus, for the attention-based
    baselines, a recorder of the queries (or attention) they score with."""

    def __init__(self, engine: "TorchEngine", scorer: KeyScorer | None = None):
        self.engine = engine
        self.recorder: AttentionRecorder | None = None
        if isinstance(scorer, BaselineScorer) and scorer.method in RECORDING:
            enable_capture(engine.model)
            self.recorder = AttentionRecorder(scorer, engine.shape.num_layers)
        self.reset()

    def reset(self) -> None:
        self.cache = TriAttentionCache(config=self.engine.model.config)
        if self.recorder is not None:
            self.recorder.reset()

    @torch.inference_mode()
    def forward(self, token_ids: list[int], start_position: int) -> np.ndarray:
        device = self.engine.device
        ids = torch.tensor([token_ids], device=device)
        positions = torch.arange(start_position, start_position + len(token_ids), device=device)[None]
        record = {RECORDER_KWARG: self.recorder} if self.recorder is not None else {}
        out = self.engine.model(input_ids=ids, position_ids=positions, cache=self.cache, use_cache=True,
                                logits_to_keep=1, **record)
        return out.logits[0, -1].float().cpu().numpy()

    @torch.inference_mode()
    def head_scores(self, scorer: KeyScorer, round_start: int) -> np.ndarray:
        if isinstance(scorer, BaselineScorer):
            return baseline_head_scores(scorer, self.cache, self.recorder)
        return self.cache.head_scores(scorer, round_start)

    @torch.inference_mode()
    def compact(self, keep: np.ndarray) -> None:
        self.cache.compact(keep)
        if self.recorder is not None:
            self.recorder.compact(keep)


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto"):
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
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=self.dtype).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise UserError(f"{model_path}: cannot load the model ({str(e).splitlines()[0]})") from None
        self.model_id = str(path)
        self.model_path = path
        s = self.shape
        self.kv_bytes_per_token = 2 * s.num_layers * s.num_kv_heads * s.head_dim * torch.finfo(self.dtype).bits // 8
        self.context_length = s.max_position_embeddings

    def new_runner(self, scorer: KeyScorer | None = None) -> TorchRunner:
        return TorchRunner(self, scorer)

    def calibrate(self, text: str, progress: bool = True, max_tokens: int | None = None):
        from .calibrate import calibrate

        return calibrate(self.model, self.tokenizer, text, model_id=self.model_id, max_tokens=max_tokens,
                         progress=progress)
