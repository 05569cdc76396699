"""A small random-init Qwen3 model for agent-sized prompts: a 32k-position context and a byte-level BPE tokenizer
trained here on agent-like text (about 4 characters a token), with a Qwen3-like chat template (tools, <think>,
enable_thinking). Also the synthetic OpenClaw-like request pieces: a long system prompt and 12 tool schemas.

Used by the OpenClaw tests and by benchmarks/openclaw_prefix_reuse.py. Random weights: replies are gibberish unless
the scripted runner (serve_scripted.py) dictates them; prefill, compression and reuse are real."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_scripted import QWEN3_LIKE_TEMPLATE  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
            "<tool_response>", "</tool_response>"]
VOCAB = 4096
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=32768, bos_token_id=0, eos_token_id=2)

WORDS = ("agent tool file read write edit run command shell workspace memory session user assistant message reply "
         "context project search web fetch browser image skill channel heartbeat cron task plan step check result "
         "error retry output input path directory config model provider token budget cache safety policy never "
         "always should must may when before after only unless ask confirm respect privacy secret key local remote "
         "the a an of to in for on with by from as is are be this that it you your we our their which what how "
         "keep short clear exact brief update note daily long term summary compact history turn prompt system").split()


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
    return " ".join(words).capitalize() + "."


def system_prompt(chars: int = 40000, seed: int = 0) -> str:
    """An OpenClaw-sized system prompt: markdown sections of bullet sentences."""
    rng = random.Random(seed)
    out, n = [], 0
    while n < chars:
        title = f"## {rng.choice(WORDS).capitalize()} {rng.choice(WORDS)}\n"
        body = "".join(f"- {sentence(rng)}\n" for _ in range(rng.randint(3, 8)))
        out.append(title + body + "\n")
        n += len(out[-1])
    return "".join(out)[:chars]


def tools(count: int = 12, seed: int = 1) -> list[dict]:
    """OpenAI function tools with OpenClaw-like schemas (~10k characters for 12)."""
    rng = random.Random(seed)
    names = ["read", "write", "edit", "exec", "process", "web_search", "web_fetch", "browser", "image", "memory_search",
             "sessions_send", "cron", "message", "canvas"]
    out = []
    for name in names[:count]:
        props = {}
        for _ in range(rng.randint(3, 6)):
            props[rng.choice(WORDS) + "_" + rng.choice(WORDS)] = {
                "type": rng.choice(["string", "number", "boolean"]), "description": " ".join(
                    sentence(rng) for _ in range(2))}
        out.append({"type": "function", "function": {
            "name": name, "description": " ".join(sentence(rng) for _ in range(3)), "strict": False,
            "parameters": {"type": "object", "properties": props, "required": list(props)[:1]}}})
    return out


def internal_context(turn: int) -> str:
    """OpenClaw's transient last user message of a turn (never replayed)."""
    return (f"<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>\nturn {turn}: current time 2026-12-07T08:0{turn}:00Z; "
            f"runtime local; workspace /tmp/work; heartbeat off.\n<<<END_OPENCLAW_INTERNAL_CONTEXT>>>")


def corpus() -> str:
    text = system_prompt(60000, seed=7) + json.dumps(tools(14, seed=8), indent=1) + internal_context(1)
    return text * 2


def build_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIALS[1:])
    fast.chat_template = QWEN3_LIKE_TEMPLATE
    fast.model_max_length = CONFIG["max_position_embeddings"]
    fast.save_pretrained(str(path))


def make_agent_model(path: Path, seed: int = 0) -> Path:
    """Write the model (config, random weights, BPE tokenizer) into path and return it."""
    from triattn_local.tiny_model import make_model

    path = Path(path)
    make_model(path, "qwen3", seed=seed, **CONFIG)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    build_tokenizer(path)
    return path


if __name__ == "__main__":
    print(make_agent_model(Path(sys.argv[1])))
