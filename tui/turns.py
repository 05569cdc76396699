"""Token ids of a chat turn: the whole conversation for an empty cache, or only what follows the cached reply.

A Session continues from whatever its cache holds, so after a reply only the template text that closes that reply
and opens the next one (end-of-turn, the new user message, the assistant header) is fed. That text is found by
rendering the model's own chat template around a marker reply, so any template works without special-casing."""

from __future__ import annotations

MARK = "\u2063triattn-reply\u2063"


def _messages(system: str | None, history: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + history


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def conversation_ids(tokenizer, system: str | None, history: list[dict]) -> list[int]:
    """The whole conversation (history ends with the user's new message), ready for the assistant's reply."""
    if not has_template(tokenizer):
        text = "\n\n".join(m["content"] for m in history) + "\n\n"
        return list(tokenizer.encode(text))
    ids = tokenizer.apply_chat_template(_messages(system, history), add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def next_turn_text(tokenizer, system: str | None, user_text: str) -> str:
    """Template text between the end of a cached reply and the start of the next one."""
    if not has_template(tokenizer):
        return "\n\n" + user_text + "\n\n"
    history = [{"role": "user", "content": "…"}, {"role": "assistant", "content": MARK},
               {"role": "user", "content": user_text}]
    text = tokenizer.apply_chat_template(_messages(system, history), add_generation_prompt=True, tokenize=False)
    return text[text.index(MARK) + len(MARK):]


def next_turn_ids(tokenizer, system: str | None, user_text: str) -> list[int]:
    return list(tokenizer.encode(next_turn_text(tokenizer, system, user_text), add_special_tokens=False))


def opens_thinking(tokenizer, prompt_ids: list[int]) -> bool:
    """Whether the prompt ends inside an opened <think> (templates that start the reasoning for the model)."""
    tail = tokenizer.decode(prompt_ids[-8:], skip_special_tokens=False)
    return tail.rstrip().endswith("<think>")
