"""Builds the demo model's tokenizer: one token per character, byte fallback for everything else.

It is written twice from one vocabulary: tokenizer.model (SentencePiece, what llama.cpp's converter reads) and
tokenizer.json (Hugging Face tokenizers, what transformers and mlx-lm read); ids agree by construction and a check
at the end encodes sample texts both ways.

    python scripts/build_demo_tokenizer.py triattn_local/demo/model
"""

from __future__ import annotations

import json
import string
import sys
import tempfile
from pathlib import Path

SPECIAL = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# A user turn always ends in a newline, as the training prompts do: `triattn run demo "$(…)"` drops the last one.
CHAT_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{%- if m['role'] == 'user' and not m['content'].endswith('\n') %}{{ '\\n' }}{% endif %}<|im_end|>\n{% endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}"
)


def build(out: Path) -> None:
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers, AddedToken

    out.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_letters + string.digits + string.punctuation + " "
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "chars.txt"
        text.write_text("\n".join([chars] * 20))
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(out / "tokenizer"), model_type="char", vocab_size=400,
            hard_vocab_limit=False, user_defined_symbols=SPECIAL, byte_fallback=True, character_coverage=1.0,
            add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        )
    (out / "tokenizer.vocab").unlink()
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192, "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "</s>", "unk_token": "<unk>", "add_bos_token": False,
        "add_eos_token": False, "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    check(out, sp)
    print(f"wrote {out}: {sp.vocab_size()} tokens")


def check(out: Path, sp) -> None:
    """Both tokenizers give the same ids and decode back to the text."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out))
    samples = ["Continue the lagged sum: 117:4+9=3\n116:3+0=3\n", "<|im_start|>user\nhé ☃ x<|im_end|>\n<think>\n",
               "  two  spaces\tand tab", "</think>\nThe final value is 7."]
    for s in samples:
        a = hf.encode(s, add_special_tokens=False)
        b = sp.encode(s)
        plain = not any(t in s for t in SPECIAL)
        if plain:
            assert a == b, (s, a, b)
        assert hf.decode(a) == s, (s, hf.decode(a))


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "triattn_local/demo/model"))
