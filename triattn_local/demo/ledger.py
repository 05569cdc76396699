"""The ledger demo's task: people's counts stated in prose, a list of trades, and a thinking trace that applies them.

The prompt states 12–40 facts ("Alden holds 7 lanterns.") among irrelevant paragraphs, then numbered trades
("14. Alden gives 3 to Brisa."), and asks about one person at the end. The thinking applies every trade on its own
line, restating both updated values, with an occasional recap of a few people:

    14. Alden gives 3 to Brisa. Alden 7-3=4. Brisa 3+3=6.
    Recap: Cato 5, Alden 4, Mira 2.

so each line needs the trade from the prompt and each person's latest value, written wherever that person last
appeared: a line or two up for someone who trades often, thousands of tokens back (the prompt's fact) for someone
who trades rarely. People are drawn with Zipf weights, so lookup distances spread from ~10 tokens to the whole
sequence, with no fixed lag. Values stay within 0–9 (a trade never takes more than the giver holds, nor lifts the
receiver past 9), so every step is one-digit arithmetic and a wrong step shows in the checker.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, replace
from typing import Callable
from importlib import resources

MIN_PEOPLE, MAX_PEOPLE = 12, 40
MIN_TRADES, MAX_TRADES = 32, 192  # log-uniform
ITEMS = ("lanterns", "coins", "apples", "shells", "stamps", "keys", "pebbles", "candles")
ANSWER_RE = re.compile(r"^(\w+) holds (\d) (\w+)\.", re.M)
TRADE_RE = re.compile(r"^(\d+)\. (\w+) gives (\d) to (\w+)\. (\w+) (\d)-(\d)=(\d)\. (\w+) (\d)\+(\d)=(\d)\.$")
RECAP_RE = re.compile(r"^Recap: (.*)\.$")


def _lines(name: str) -> list[str]:
    text = (resources.files("triattn_local.demo") / "ledger_data" / name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


_NAMES: list[str] = []
_FILLER: list[str] = []


def names() -> list[str]:
    if not _NAMES:
        _NAMES.extend(_lines("names.txt"))
    return _NAMES


def filler() -> list[str]:
    if not _FILLER:
        _FILLER.extend(_lines("filler.txt"))
    return _FILLER


@dataclass
class Problem:
    item: str
    facts: list[tuple[str, int]]  # (person, starting value) in the order stated
    prose: list[str]  # the prompt's fact section: facts and filler paragraphs, one a line
    trades: list[tuple[str, int, str]]  # (giver, amount, receiver)
    thinking_lines: list[str]
    asked: str
    answer: int

    @property
    def prompt(self) -> str:
        trades = "".join(f"{i}. {g} gives {a} to {r}.\n" for i, (g, a, r) in enumerate(self.trades, 1))
        return (f"Keep the ledger. Each person starts with the {self.item} stated below; then the trades happen in "
                f"order. How many {self.item} does {self.asked} hold at the end?\n\n"
                + "\n".join(self.prose) + "\n\nTrades:\n" + trades)

    @property
    def thinking(self) -> str:
        return "".join(line + "\n" for line in self.thinking_lines)

    @property
    def response(self) -> str:
        """The assistant turn as the model is trained to write it."""
        return f"<think>\n{self.thinking}</think>\n\n{self.asked} holds {self.answer} {self.item}."


def _zipf_pick(rng: random.Random, people: list[str], weights: list[float], avoid: str | None = None) -> str:
    while True:
        p = rng.choices(people, weights)[0]
        if p != avoid:
            return p


def make_problem(rng: random.Random, trades: int | None = None, people: int | None = None,
                 filler_rate: float = 0.6) -> Problem:
    """A problem with `trades` trades among `people` people (random when None: log-uniform trades), a filler
    paragraph after a fact line with probability `filler_rate` (training's short warm-up problems use less)."""
    n_people = people or rng.randint(MIN_PEOPLE, MAX_PEOPLE)
    n_trades = trades or round(math.exp(rng.uniform(math.log(MIN_TRADES), math.log(MAX_TRADES))))
    who = rng.sample(names(), n_people)
    item = rng.choice(ITEMS)
    value = {p: rng.randint(0, 9) for p in who}
    facts = [(p, value[p]) for p in who]
    # facts among filler paragraphs: each fact line holds one or two facts, a paragraph between some of them
    prose, i, pool = [], 0, filler()
    while i < len(facts):
        k = rng.choice((1, 1, 2))
        prose.append(" ".join(f"{p} holds {v} {item}." for p, v in facts[i:i + k]))
        i += k
        if rng.random() < filler_rate:
            prose.append(rng.choice(pool))
    weights = [1.0 / (rank + 1) for rank in range(n_people)]  # Zipf: who trades often is random per problem
    order = who[:]
    rng.shuffle(order)
    trade_list, lines, since_recap, recap_every = [], [], 0, rng.randint(8, 24)
    while len(trade_list) < n_trades:
        giver = _zipf_pick(rng, order, weights)
        receiver = _zipf_pick(rng, order, weights, avoid=giver)
        most = min(value[giver], 9 - value[receiver])
        if most < 1:
            continue
        amount = rng.randint(1, most)
        g0, r0 = value[giver], value[receiver]
        value[giver], value[receiver] = g0 - amount, r0 + amount
        trade_list.append((giver, amount, receiver))
        lines.append(f"{len(trade_list)}. {giver} gives {amount} to {receiver}. {giver} {g0}-{amount}={g0 - amount}. "
                     f"{receiver} {r0}+{amount}={r0 + amount}.")
        since_recap += 1
        if since_recap >= recap_every and len(trade_list) < n_trades:
            shown = rng.sample(who, 3)
            lines.append("Recap: " + ", ".join(f"{p} {value[p]}" for p in shown) + ".")
            since_recap, recap_every = 0, rng.randint(8, 24)
    asked = rng.choice(who)
    return Problem(item, facts, prose, trade_list, lines, asked, value[asked])


def pad_to(problem: Problem, tokens: int, count: Callable[[str], int], tries: int = 20) -> Problem | None:
    """The problem with filler words added to its last filler paragraph (or a new one), so that its prompt is
    exactly `tokens` long (count(prompt) = its length in tokens); None when no filler hits the length exactly.
    Batched generation needs prompts of one length; filler changes nothing a line of the thinking reads."""
    if count(problem.prompt) >= tokens:
        return problem if count(problem.prompt) == tokens else None
    rng = random.Random(len(problem.prompt))
    at = next((i for i in range(len(problem.prose) - 1, -1, -1) if " holds " not in problem.prose[i]), None)

    def padded(words: list[str]) -> Problem:
        prose = list(problem.prose)
        if at is None:
            prose.append(" ".join(words))
        else:
            prose[at] += " " + " ".join(words)
        return replace(problem, prose=prose)

    for _ in range(tries):
        words = " ".join(rng.sample(filler(), 40)).split(" ")
        lo, hi = 1, len(words)
        while lo <= hi:  # token counts grow with the words added: search the count that hits `tokens`
            mid = (lo + hi) // 2
            c = padded(words[:mid])
            n = count(c.prompt)
            if n == tokens:
                return c
            lo, hi = (mid + 1, hi) if n < tokens else (lo, mid - 1)
    return None


def held_out_problems(count: int, seed: int = 20261207) -> list[Problem]:
    """Evaluation problems: seeds >= 10^9, which training never draws (it uses seeds below)."""
    rng = random.Random(seed + 10**9)
    return [make_problem(rng) for _ in range(count)]


def parse_answer(text: str) -> int | None:
    """The model's final count, read after its thinking; None when it gave none."""
    m = ANSWER_RE.search(text.split("</think>")[-1].strip())
    return int(m.group(2)) if m else None


def check(problem: Problem, text: str) -> list[str]:
    """Every error in a response (thinking + answer) against the problem: an empty list means all of it is right.

    Checks each trade line (the right trade, in order, with the values it must start from and the right
    arithmetic), each recap value, that every trade was applied, and the final answer."""
    errors: list[str] = []
    think, sep, answer = text.partition("</think>")
    if not sep:
        errors.append("no </think>")
    value = dict(problem.facts)
    done = 0
    for n, line in enumerate(think.replace("<think>", "").strip().splitlines(), 1):
        if m := TRADE_RE.match(line):
            k, g, a, r, g1, gv, ga, gn, r1, rv, ra, rn = m.groups()
            if int(k) != done + 1 or done >= len(problem.trades):
                errors.append(f"line {n}: trade {k} out of order")
                break
            want = problem.trades[done]
            if (g, int(a), r) != want or g1 != g or r1 != r or int(ga) != int(a) or int(ra) != int(a):
                errors.append(f"line {n}: trade {k} copied wrong ({line!r})")
            if int(gv) != value[want[0]] or int(rv) != value[want[2]]:
                errors.append(f"line {n}: trade {k} starts from stale values")
            if int(gn) != int(gv) - int(ga) or int(rn) != int(rv) + int(ra):
                errors.append(f"line {n}: trade {k} arithmetic wrong")
            value[want[0]] -= want[1]
            value[want[2]] += want[1]
            done += 1
        elif m := RECAP_RE.match(line):
            for part in m.group(1).split(", "):
                who, _, v = part.partition(" ")
                if who not in value or not v.isdigit() or int(v) != value[who]:
                    errors.append(f"line {n}: recap {part!r} wrong")
        else:
            errors.append(f"line {n}: not a trade or recap ({line[:60]!r})")
    if done != len(problem.trades):
        errors.append(f"{done} of {len(problem.trades)} trades applied")
    got = parse_answer(text) if sep else None
    if got != problem.answer:
        errors.append(f"answer {got}, expected {problem.answer}")
    return errors


def calibration_text(count: int = 8, seed: int = 7) -> str:
    """Solved problems laid out as chat conversations: in-domain text to calibrate the model's stats on."""
    rng = random.Random(seed + 2 * 10**9)
    out = []
    for _ in range(count):
        p = make_problem(rng)
        out.append(f"<|im_start|>user\n{p.prompt}<|im_end|>\n<|im_start|>assistant\n{p.response}<|im_end|>\n")
    return "".join(out)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Print a ledger problem (pipe it into `triattn run`).")
    ap.add_argument("--trades", type=int, help=f"trades to apply ({MIN_TRADES}-{MAX_TRADES}; random if omitted)")
    ap.add_argument("--people", type=int, help=f"people in the ledger ({MIN_PEOPLE}-{MAX_PEOPLE}; random if omitted)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--answer", action="store_true", help="print the expected answer instead")
    ap.add_argument("--solution", action="store_true", help="print the reference response (thinking + answer)")
    ap.add_argument("--calibration", type=int, metavar="N", help="print N solved problems (calibration text)")
    args = ap.parse_args()
    if args.calibration:
        print(calibration_text(args.calibration), end="")
        return
    p = make_problem(random.Random(args.seed), trades=args.trades, people=args.people)
    print(p.answer if args.answer else p.response if args.solution else p.prompt, end="" if not args.answer else "\n")


if __name__ == "__main__":
    main()
