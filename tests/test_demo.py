"""The embedded demo model: shape, size, tokenizer, and an accuracy smoke test (full vs TriAttention agree)."""

import json
import random
import subprocess
import sys

import pytest

from triattn_local.demo.task import LAG, make_problem, parse_answer
from triattn_local.registry import demo_model_dir

MODEL = demo_model_dir()


def test_shape_and_size():
    config = json.loads((MODEL / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["head_dim"] >= 64
    total = sum(f.stat().st_size for f in MODEL.iterdir())
    assert total <= 20 * 10**6
    assert all(f.stat().st_size <= 16 * 2**20 for f in MODEL.glob("*.safetensors"))


def test_tokenizers_agree():
    """tokenizer.json (transformers, mlx-lm) and tokenizer.model (llama.cpp's converter) give the same ids."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(MODEL))
    sp = spm.SentencePieceProcessor(model_file=str(MODEL / "tokenizer.model"))
    p = make_problem(random.Random(0), steps=60)
    for text in (p.prompt, p.thinking, "Héllo, wörld! ☃ tabs\tand  spaces"):
        assert hf.encode(text, add_special_tokens=False) == sp.encode(text)
    assert hf.decode(hf.encode(p.prompt, add_special_tokens=False)) == p.prompt


def test_task_lines_depend_on_the_line_lag_lines_up():
    p = make_problem(random.Random(3), steps=80)
    values = [int(line[-1]) for line in p.seed_lines + p.thinking_lines]
    for i, line in enumerate(p.thinking_lines):
        k = i + LAG
        assert line.endswith(f"{values[k - 1]}+{values[k - LAG]}={values[k]}")
    assert p.answer == values[-1] and parse_answer(p.response) == p.answer


def test_accuracy_smoke_full_and_triattention_agree():
    """Greedy on short held-out-style problems: full attention solves them, and TriAttention at a generous budget
    (a window covering the task's lag, and at least one compression round) gives the same answers."""
    from triattn_local.backends import load_engine
    from triattn_local.engine import CompressionSettings, DoneEvent, TextEvent
    from triattn_local.policy import BudgetPolicy
    from triattn_local.sampling import SamplingParams
    from triattn_local.stats.format import QueryStats

    engine = load_engine("demo", device="cpu")
    stats = QueryStats.load(MODEL / "triattn_stats.safetensors")
    rng = random.Random(99)
    problems = [make_problem(rng, steps=50) for _ in range(2)]
    for p in problems:
        answers = []
        for settings in (CompressionSettings(policy=None),
                         CompressionSettings(BudgetPolicy(768, 32, 320, 4), stats=stats)):
            text, done = "", None
            for ev in engine.session(settings).generate(engine.encode_prompt(p.prompt),
                                                        SamplingParams(max_tokens=800, temperature=0)):
                if isinstance(ev, TextEvent):
                    text += ev.text
                elif isinstance(ev, DoneEvent):
                    done = ev
            answers.append(parse_answer(text))
        assert done.metrics.rounds >= 1  # TriAttention really compressed
        assert answers == [p.answer, p.answer]


def test_run_demo_from_the_command_line():
    """As a user types it: `triattn run demo "$(python -m triattn_local.demo.task …)"`, which drops the problem's
    last newline (the chat template puts it back)."""
    p = make_problem(random.Random(5), steps=50)
    r = subprocess.run([sys.executable, "-m", "triattn_local.cli", "run", "demo", p.prompt.rstrip("\n"),
                        "--temperature", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "<think>" in r.stdout and f"The final value is {p.answer}." in r.stdout


def test_teacher_forcing_counts_the_tokens_compression_gets_wrong():
    """Teacher forcing feeds each reference response under compression and counts greedy misses: none (or nearly)
    with full attention, more with a budget whose window misses the task's lag; a row without a miss is exactly
    what free greedy decoding produces."""
    from triattn_local.backends import load_engine
    from triattn_local.batch import generate_batch
    from triattn_local.engine import CompressionSettings
    from triattn_local.policy import BudgetPolicy
    from triattn_local.sampling import SamplingParams
    from triattn_local.stats.format import QueryStats

    engine = load_engine("demo", device="cpu")
    rng = random.Random(5)
    problems = [make_problem(rng, steps=60) for _ in range(2)]
    prompts = [engine.encode_prompt(p.prompt) for p in problems]
    end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    forced = [engine.tokenizer.encode(p.response, add_special_tokens=False) + [end] for p in problems]
    params = SamplingParams(max_tokens=max(len(f) for f in forced), temperature=0.0)
    full = CompressionSettings(policy=None)
    tight = CompressionSettings(BudgetPolicy(64, 16, 16, 0),
                                stats=QueryStats.load(MODEL / "triattn_stats.safetensors"))
    forced_full = generate_batch(engine, prompts, full, params, forced=forced)
    forced_tight = generate_batch(engine, prompts, tight, params, forced=forced)
    assert [r.token_ids for r in forced_full] == forced == [r.token_ids for r in forced_tight]
    total = sum(len(f) for f in forced)
    errors_full = sum(r.forced_errors for r in forced_full)
    errors_tight = sum(r.forced_errors for r in forced_tight)
    assert errors_full <= 0.01 * total and errors_tight > errors_full
    free = generate_batch(engine, prompts, full, params)
    for r, f, teacher in zip(free, forced, forced_full):
        assert (r.token_ids == f) == (teacher.forced_errors == 0)
