"""The demo model's task: a lagged sum traced line by line, whose every step needs a value from far back.

The user gives LAG seed lines; the model continues the sequence, one line per step, counting down to 000:

    117:4+9=3        counter : previous value + value LAG lines up = their sum mod 10

so line i reads the value of line i-1 (next to it) and of line i-LAG (LAG × 10 tokens back, about 240 tokens),
and the final answer is the value on line 000. One wrong step changes every later value, so the answer checks the
whole chain. A KV cache that drops the value LAG lines up breaks it: exactly what compression must not lose.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

LAG = 24
MIN_STEPS, MAX_STEPS = 50, 380  # chain of thought of 500–3800 tokens (10 per line)
INSTRUCTION = (
    f"Continue the lagged sum: each new line adds the previous value and the value {LAG} lines up, mod 10, "
    "counting down to 000. What is the final value?"
)
ANSWER_RE = re.compile(r"The final value is (\d)\.")


@dataclass
class Problem:
    seed_lines: list[str]
    thinking_lines: list[str]
    answer: int

    @property
    def prompt(self) -> str:
        return INSTRUCTION + "\n" + "".join(line + "\n" for line in self.seed_lines)

    @property
    def thinking(self) -> str:
        return "".join(line + "\n" for line in self.thinking_lines)

    @property
    def response(self) -> str:
        """The assistant turn as the model is trained to write it."""
        return f"<think>\n{self.thinking}</think>\nThe final value is {self.answer}."


def line(counter: int, a: int, b: int) -> str:
    return f"{counter:03d}:{a}+{b}={(a + b) % 10}"


def make_problem(rng: random.Random, steps: int | None = None) -> Problem:
    """A problem with `steps` lines to compute (random in [MIN_STEPS, MAX_STEPS] when None)."""
    steps = rng.randint(MIN_STEPS, MAX_STEPS) if steps is None else steps
    values, seed_lines = [], []
    for k in range(LAG):
        a, b = rng.randrange(10), rng.randrange(10)
        seed_lines.append(line(steps + LAG - 1 - k, a, b))
        values.append((a + b) % 10)
    thinking = []
    for k in range(steps):
        a, b = values[-1], values[-LAG]
        thinking.append(line(steps - 1 - k, a, b))
        values.append((a + b) % 10)
    return Problem(seed_lines, thinking, values[-1])


def held_out_problems(count: int, seed: int = 20261129) -> list[Problem]:
    """Evaluation problems: a seed the training data never uses (training draws from seeds < 10^9)."""
    rng = random.Random(seed + 10**9)
    return [make_problem(rng) for _ in range(count)]


def parse_answer(text: str) -> int | None:
    """The model's final value, read after its thinking; None when it gave none."""
    tail = text.split("</think>")[-1]
    m = ANSWER_RE.search(tail)
    return int(m.group(1)) if m else None


def calibration_text(count: int = 8, seed: int = 7) -> str:
    """Solved problems laid out as chat conversations: in-domain text to calibrate the demo model's stats on."""
    rng = random.Random(seed + 2 * 10**9)
    out = []
    for _ in range(count):
        p = make_problem(rng)
        out.append(f"<|im_start|>user\n{p.prompt}<|im_end|>\n<|im_start|>assistant\n{p.response}<|im_end|>\n")
    return "".join(out)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Print a demo problem (pipe it into `triattn run demo`).")
    ap.add_argument("--steps", type=int, help=f"lines to compute ({MIN_STEPS}-{MAX_STEPS}; random if omitted)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--answer", action="store_true", help="print the expected final value instead")
    ap.add_argument("--calibration", type=int, metavar="N", help="print N solved problems (calibration text)")
    args = ap.parse_args()
    if args.calibration:
        print(calibration_text(args.calibration), end="")
        return
    p = make_problem(random.Random(args.seed), steps=args.steps)
    if args.answer:
        print(p.answer)  # a line of its own, like any command's output
    else:
        print(p.prompt, end="")  # exactly the prompt, for `| triattn run demo`


if __name__ == "__main__":
    main()
