"""The ledger task: its generator, the checker that verifies traces, and the lookup distances it promises."""

from __future__ import annotations

import random

import numpy as np
import pytest

from triattn_local.demo import ledger


@pytest.fixture(scope="module")
def problems():
    return ledger.held_out_problems(40)


def test_reference_responses_pass_the_checker(problems):
    for p in problems:
        assert ledger.check(p, p.response) == []
        assert ledger.parse_answer(p.response) == p.answer
        assert ledger.MIN_TRADES <= len(p.trades) <= ledger.MAX_TRADES
        assert ledger.MIN_PEOPLE <= len(p.facts) <= ledger.MAX_PEOPLE


def test_filler_rate_sets_how_much_prose_surrounds_the_facts():
    """Training's short warm-up problems: less filler, the same kind of problem (the checker passes its solution)."""
    def filler_paragraphs(rate):
        ps = [ledger.make_problem(random.Random(seed), trades=16, people=14, filler_rate=rate) for seed in range(30)]
        assert all(ledger.check(p, p.response) == [] for p in ps)
        return sum(" holds " not in line for p in ps for line in p.prose)

    none, some, default = filler_paragraphs(0.0), filler_paragraphs(0.15), filler_paragraphs(0.6)
    assert none == 0 < some < default


def test_prompt_states_every_fact_and_trade(problems):
    p = problems[0]
    for person, value in p.facts:
        assert f"{person} holds {value} {p.item}." in p.prompt
    for i, (g, a, r) in enumerate(p.trades, 1):
        assert f"\n{i}. {g} gives {a} to {r}.\n" in p.prompt
    assert f"How many {p.item} does {p.asked} hold at the end?" in p.prompt


def test_values_stay_single_digits_and_answer_follows_the_trades(problems):
    for p in problems:
        value = dict(p.facts)
        for g, a, r in p.trades:
            value[g] -= a
            value[r] += a
            assert 0 <= value[g] <= 9 and 0 <= value[r] <= 9
        assert value[p.asked] == p.answer


@pytest.mark.parametrize("corrupt, expected", [
    (lambda line: line.replace("=", "=1", 1), "arithmetic wrong"),  # 7-3=14
    (lambda line: line.replace(" gives ", " gives 1", 1), "copied wrong"),
])
def test_checker_catches_a_wrong_line(problems, corrupt, expected):
    p = problems[1]
    i = next(i for i, line in enumerate(p.thinking_lines) if ledger.TRADE_RE.match(line))
    lines = list(p.thinking_lines)
    lines[i] = corrupt(lines[i])
    text = "<think>\n" + "\n".join(lines) + f"\n</think>\n\n{p.asked} holds {p.answer} {p.item}."
    errors = ledger.check(p, text)
    assert errors and (expected in errors[0] or "not a trade" in errors[0])


def test_checker_catches_a_stale_value_and_a_wrong_answer(problems):
    p = problems[2]
    # replay the trace but start one trade from the prompt's value instead of the latest one
    first = dict(p.facts)
    seen = set()
    for k, (g, a, r) in enumerate(p.trades):
        if g in seen:
            break
        seen.update((g, r))
    lines = [line for line in p.thinking_lines if ledger.TRADE_RE.match(line)]
    m = ledger.TRADE_RE.match(lines[k])
    wrong_start = first[g] if first[g] != int(m.group(6)) else (int(m.group(6)) + 1) % 10
    stale = lines[k].replace(f". {g} {m.group(6)}-", f". {g} {wrong_start}-", 1)
    text = p.response.replace(lines[k], stale)
    assert any("stale" in e for e in ledger.check(p, text))
    wrong = p.response.replace(f"holds {p.answer} {p.item}.", f"holds {(p.answer + 1) % 10} {p.item}.")
    assert any("answer" in e for e in ledger.check(p, wrong))
    assert "no </think>" in ledger.check(p, p.response.split("</think>")[0])[0]


def test_held_out_problems_are_reproducible_and_unlike_training_draws():
    a, b = ledger.held_out_problems(3), ledger.held_out_problems(3)
    assert [p.prompt for p in a] == [p.prompt for p in b]
    train = ledger.make_problem(random.Random(12345))
    assert train.prompt not in {p.prompt for p in a}


def test_lookup_distances_spread_over_orders_of_magnitude(problems):
    """No fixed lag: the distance from a line back to a value it needs spans ~10 to thousands of tokens."""
    from transformers import AutoTokenizer

    from triattn_local.diagnose import lookup_distances

    tok = AutoTokenizer.from_pretrained(str(ledger_model_dir()))
    d = np.concatenate([lookup_distances(tok, p) for p in problems[:10]])
    assert np.quantile(d, 0.1) < 60
    assert np.quantile(d, 0.9) > 1000
    assert (d > 512).mean() > 0.15  # a recent window of 512 tokens misses many lookups


def ledger_model_dir():
    from importlib import resources

    return resources.files("triattn_local") / "demo" / "ledger_model"


def test_padding_reaches_the_length_and_keeps_the_problem(problems):
    """Batched evaluation pads shorter prompts with filler prose; the facts, trades and answer stay as they were."""
    from tokenizers import Tokenizer


    tok = Tokenizer.from_file(str(ledger_model_dir() / "tokenizer.json"))
    count = lambda text: len(tok.encode(text).ids)  # noqa: E731
    short = min(problems[:10], key=lambda p: count(p.prompt))
    target = count(short.prompt) + 157
    padded = ledger.pad_to(short, target, count)
    assert padded is not None and count(padded.prompt) == target
    assert padded.answer == short.answer and padded.trades == short.trades and padded.response == short.response
    assert ledger.check(padded, short.response) == []
    assert ledger.pad_to(short, count(short.prompt) - 1, count) is None  # cannot shorten


def test_eval_batches_hold_one_prompt_length_and_every_problem(problems):
    from types import SimpleNamespace

    from tokenizers import Tokenizer

    from triattn_local.eval import length_matched

    tok = Tokenizer.from_file(str(ledger_model_dir() / "tokenizer.json"))
    engine = SimpleNamespace(encode_prompt=lambda text: tok.encode(text).ids)
    batches = length_matched(problems[:12], engine, ledger, 4)
    assert all(b and len({len(ids) for ids, _ in b}) == 1 for b in batches)
    assert all(len(b) <= 4 for b in batches)
    solved = [p for b in batches for _, p in b]
    assert sorted((p.asked, p.answer, tuple(p.trades)) for p in solved) == \
        sorted((p.asked, p.answer, tuple(p.trades)) for p in problems[:12])


def test_copy_rows_repeat_a_random_sequence_and_score_only_its_second_copy():
    """train_ledger --repeat: a prose row's start becomes a random sequence written twice, with labels on the second
    copy alone (its first token excepted), so only copying lowers the loss there."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_ledger.py"
    spec = importlib.util.spec_from_file_location("train_ledger", path)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    rng = random.Random(3)
    alphabets = set()
    for _ in range(20):
        prose = np.arange(1000, 1400, dtype=np.int64)
        inputs, labels = prose.copy(), prose.copy()
        train.copy_row(rng, inputs, labels)
        n = int((labels[1:] == -100).sum())  # the first copy and the second's first token
        assert 32 <= n <= 200 and np.array_equal(inputs[:n], inputs[n:2 * n])
        assert np.all(labels[:n + 1] == -100) and np.array_equal(labels[n + 1:2 * n], inputs[n + 1:2 * n])
        assert np.array_equal(inputs[2 * n:], prose[2 * n:]) and np.array_equal(labels[2 * n:], prose[2 * n:])
        digits = set(inputs[:n].tolist()) <= set(train.DIGIT_IDS)
        assert digits or set(inputs[:n].tolist()) <= set(train.WORD_IDS)
        alphabets.add(digits)
    assert alphabets == {True, False}  # both kinds of sequence are drawn
    from tokenizers import Tokenizer  # the alphabets' ids are the ledger tokenizer's digits, '.' and ' '

    tok = Tokenizer.from_file(str(train.MODEL_DIR / "tokenizer.json"))
    assert [tok.decode([i]) for i in train.DIGIT_IDS] == list("0123456789. ")
    assert len(tok.id_to_token(train.WORD_IDS.start)) > 1  # merged tokens from here on, single bytes below
    assert train.WORD_IDS.stop == train.PAD and tok.id_to_token(train.PAD) == "<|endoftext|>"  # specials after
