"""Tiny random-init models of each supported architecture, built offline from hand-written configs.

For tests and for trying the CLI without a download: `python -m triattn_local.tiny_model DIR [--arch qwen3]`.
Random weights produce gibberish text; they exercise every code path of a real model of that architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

BASE = dict(
    vocab_size=320,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=4096,
    initializer_range=0.2,  # peaked logits, so greedy decoding has no near-ties
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

CONFIGS = {
    "qwen3": dict(BASE, model_type="qwen3", architectures=["Qwen3ForCausalLM"], rope_theta=1000000.0),
    "qwen2": dict(BASE, model_type="qwen2", architectures=["Qwen2ForCausalLM"], rope_theta=10000.0),
    "llama": dict(
        BASE,
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=512,
        ),
    ),
}


def make_tokenizer(path: Path) -> None:
    """A byte-level BPE-free tokenizer: one token per byte plus a few specials, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 3, "<|im_end|>": 4}
    byte_tokens = pre_tokenizers.ByteLevel.alphabet()
    for i, ch in enumerate(sorted(byte_tokens)):
        vocab[ch] = 5 + i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), pre_tokenizers.Split("", "isolated")]
    )
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(str(path))


def make_model(path: Path, arch: str = "qwen3", seed: int = 0, **overrides) -> Path:
    """Write config.json, random weights and a tokenizer into path (a directory) and return it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(CONFIGS[arch], **overrides)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    config = AutoConfig.from_pretrained(str(path))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(path))
    (path / "config.json").write_text(json.dumps(cfg, indent=1))  # keep the hand-written config as is
    make_tokenizer(path)
    return path


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random-init model directory (no download).")
    parser.add_argument("path")
    parser.add_argument("--arch", choices=sorted(CONFIGS), default="qwen3")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_model(Path(args.path), args.arch, seed=args.seed))


if __name__ == "__main__":
    main()
