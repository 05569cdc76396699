"""Trains the ledger demo's tokenizer: byte-level BPE (Qwen2's pre-tokenizer, one digit a token), 8192 tokens.

Trained on the prose corpus (scripts/demo_data.py) and solved ledger problems, so ordinary English text comes out
at about four characters a token. Special tokens and chat template follow Qwen3's: <|im_start|>, <|im_end|>,
<|endoftext|>, <think> and </think>, and `enable_thinking=False` opens an empty think block.

    python scripts/build_ledger_tokenizer.py .demo-data/corpus.txt triattn_local/demo/ledger_model
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from triattn_local.files import write_atomic  # noqa: E402

VOCAB_SIZE = 8192
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK = ["<think>", "</think>"]
# Qwen2/Qwen3's split pattern: llama.cpp knows it as the `qwen2` pre-tokenizer
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
         r"\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def build(corpus: Path, out: Path) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from triattn_local.demo.ledger import make_problem

    rng = random.Random(5)
    problems = [make_problem(rng) for _ in range(300)]
    texts = corpus.read_text(encoding="utf-8").splitlines()
    texts += [p.prompt + p.response for p in problems]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(SPECIAL) - len(THINK), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "tokenizer.json", tok.to_str(pretty=False))
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 32768, "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False,
        "add_prefix_space": False, "clean_up_tokenization_spaces": False, "errors": "replace",
        "chat_template": CHAT_TEMPLATE,
    }
    write_atomic(out / "tokenizer_config.json", json.dumps(config, indent=1) + "\n")
    report(out, texts[:2000], problems[:50])


def report(out: Path, prose: list[str], problems) -> None:
    """Characters per token on prose and on ledger problems; decode(encode(x)) == x; the chat template renders."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out))
    for name, texts in (("prose", prose), ("ledger", [p.prompt + p.response for p in problems])):
        ids = hf(texts, add_special_tokens=False)["input_ids"]
        print(f"{name}: {sum(map(len, texts)) / sum(map(len, ids)):.2f} characters a token")
        assert all(hf.decode(i) == t for i, t in zip(ids[:50], texts[:50]))
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True,
                                  enable_thinking=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", chat
    print(f"wrote {out}: {len(hf)} tokens")


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "triattn_local/demo/ledger_model"))
