"""A Hugging Face-style tokenizer over llama.cpp's vocabulary and the GGUF's chat template.

Session, StreamingDetokenizer and Engine.encode_prompt call encode, decode(ids, skip_special_tokens=False),
apply_chat_template, convert_tokens_to_ids and eos_token_id; this gives them llama.cpp's own tokenization, so the
ids are exactly the ones the GGUF model was converted with.
"""

from __future__ import annotations

import ctypes

import llama_cpp as lc


class LlamaCppTokenizer:
    def __init__(self, vocab, chat_template: str | None):
        self.vocab = vocab
        self.vocab_size = lc.llama_vocab_n_tokens(vocab)
        self.chat_template = chat_template or None
        self.eos_token_id = _token_or_none(lc.llama_vocab_eos(vocab))
        self.bos_token_id = _token_or_none(lc.llama_vocab_bos(vocab))
        self.unk_token_id = None
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self._vocab: dict[str, int] | None = None

    # -- text → ids --
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; special tokens written in the text (e.g. <|im_end|>) become their ids, as in HF."""
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            buf = (lc.llama_token * size)()
            n = lc.llama_tokenize(self.vocab, data, len(data), buf, size, add_special_tokens, True)
            if n >= 0:
                return list(buf[:n])
            size = -n

    def __call__(self, text: str, add_special_tokens: bool = True, **_) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def convert_tokens_to_ids(self, token: str) -> int | None:
        """The id of a single token's text, or None when it is not one token of the vocabulary."""
        ids = self.encode(token, add_special_tokens=False)
        if len(ids) == 1 and self._piece(ids[0], True).decode("utf-8", "replace") == token:
            return ids[0]
        return None

    def get_vocab(self) -> dict[str, int]:
        """Token text → id, as stored in the GGUF (HF's get_vocab; the server asks it whether <think> is a token)."""
        if self._vocab is None:
            self._vocab = {lc.llama_vocab_get_text(self.vocab, t).decode("utf-8", "replace"): t
                           for t in range(self.vocab_size)}
        return self._vocab

    # -- ids → text --
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        data = b"".join(self._piece(int(i), not skip_special_tokens) for i in ids)
        return data.decode("utf-8", errors="replace")

    def _piece(self, token: int, special: bool) -> bytes:
        key = (token, special)
        piece = self._pieces.get(key)
        if piece is None:
            size = 32
            while True:
                buf = ctypes.create_string_buffer(size)
                n = lc.llama_token_to_piece(self.vocab, token, buf, size, 0, special)
                if n >= 0:
                    break
                size = -n
            piece = self._pieces[key] = buf.raw[:n]
        return piece

    # -- chat --
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = True,
                            **kwargs):
        """The GGUF's Jinja chat template rendered as transformers renders it, then tokenized without extra
        specials (the template writes them)."""
        if not self.chat_template:
            raise ValueError("this GGUF has no chat template")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def text(token_id):
            return "" if token_id is None else self._piece(token_id, True).decode("utf-8", "replace")

        formatter = Jinja2ChatFormatter(self.chat_template, eos_token=text(self.eos_token_id),
                                        bos_token=text(self.bos_token_id), add_generation_prompt=add_generation_prompt)
        prompt = formatter(messages=messages, **kwargs).prompt
        return self.encode(prompt, add_special_tokens=False) if tokenize else prompt

    def eog_token_ids(self) -> set[int]:
        """Every end-of-generation token llama.cpp knows for this vocabulary (EOS, EOT, <|im_end|> …)."""
        return {t for t in range(self.vocab_size) if lc.llama_vocab_is_eog(self.vocab, t)}


def _token_or_none(token: int) -> int | None:
    return None if token < 0 else int(token)
