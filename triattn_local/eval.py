"""`triattn eval`: accuracy on held-out demo problems under a KV budget, for TriAttention and the baselines.

Every method runs behind the same budget policy (sinks, recent window, divide length, pruning mode), at each
budget, on the same problems, greedily; full attention is the reference. Results: a JSON file, a markdown table
(accuracy, 95 % Wilson interval, problem count per cell) and a PNG plot (accuracy vs budget and vs KV memory).
Cells can run in several processes at once (--jobs), which keeps a GPU busy with this small model.
Results go to a folder the user names or a fresh one, so a smoke run never overwrites the shipped results/fidelity.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError

DEFAULT_METHODS = ("full", "triattention", "snapkv", "rkv", "h2o", "streaming")
DEFAULT_BUDGETS = (128, 192, 256, 512, 1280)


@dataclass
class Cell:
    method: str
    budget: int | None  # None: full attention
    problems: int
    correct: int
    mean_peak_kv_tokens: float
    mean_kv_bytes_peak: float
    mean_logical_tokens: float
    seconds: float
    forced_tokens: int = 0  # teacher forcing (--teacher-forcing): reference tokens fed
    forced_errors: int = 0  # … where the greedy next token was another

    @property
    def token_error_rate(self) -> float | None:
        """Per-token error under teacher forcing: the share of reference tokens the model would not have chosen."""
        return self.forced_errors / self.forced_tokens if self.forced_tokens else None

    @property
    def accuracy(self) -> float:
        return self.correct / self.problems if self.problems else 0.0

    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.problems)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n (well behaved at 0 % and 100 %)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class EvalConfig:
    model: str = "demo"
    problems: int = 200
    window: int = 32
    divide_length: int = 32
    sinks: int = 0  # the reference default; StreamingLLM keeps its own 4 sinks
    pruning_mode: str = "per_head"
    protect_prefill: bool = False
    device: str = "auto"
    dtype: str = "auto"
    batch: int = 256
    max_offset: int = 65536
    seed: int = 20261129
    task: str = "auto"  # lagsum | ledger; auto: ledger for the `ledger` model, else the lagged sum
    teacher_forcing: bool = False  # also feed each reference response and count greedy misses per token


def task_module(cfg: EvalConfig):
    """The task whose held-out problems the model is tested on (its generator, parser and longest answer)."""
    name = cfg.task
    if name == "auto":
        name = "ledger" if cfg.model == "ledger" else "lagsum"
    if name == "ledger":
        from .demo import ledger

        return ledger
    if name == "lagsum":
        from .demo import task

        return task
    raise UserError(f"--task must be lagsum or ledger, not {name!r}")


def max_answer_tokens(task) -> int:
    """Enough new tokens for the longest reference response of the task."""
    if hasattr(task, "MAX_TRADES"):
        return 32 * task.MAX_TRADES + 64
    return 10 * task.MAX_STEPS + 64


def run_cell(cfg: EvalConfig, method: str, budget: int | None) -> Cell:
    """One (method, budget) cell: every problem, batched, greedy."""
    from .backends import load_engine
    from .batch import generate_batch
    from .engine import CompressionSettings
    from .policy import BudgetPolicy
    from .sampling import SamplingParams
    from .stats_cache import resolve_stats

    task = task_module(cfg)
    engine = load_engine(cfg.model, device=cfg.device, dtype=cfg.dtype)
    problems = task.held_out_problems(cfg.problems, **({"seed": cfg.seed} if cfg.task == "lagsum" else {}))
    if method == "full":
        settings = CompressionSettings(policy=None)
    else:
        policy = BudgetPolicy(budget, cfg.divide_length, cfg.window, cfg.sinks, cfg.protect_prefill, cfg.pruning_mode)
        stats = resolve_stats(engine, None) if method == "triattention" else None
        settings = CompressionSettings(policy=policy, stats=stats, method=method, max_offset=cfg.max_offset)
    params = SamplingParams(max_tokens=max_answer_tokens(task), temperature=0.0)
    start = time.perf_counter()
    results, solved = [], []  # in batch order: problems sorted by prompt length, padded (length_matched)
    for batch in length_matched(problems, engine, task, cfg.batch):
        results += generate_batch(engine, [ids for ids, _ in batch], settings, params)
        solved += [p for _, p in batch]
    correct = sum(task.parse_answer(r.text) == p.answer for r, p in zip(results, solved))
    n = len(results)
    forced_tokens = forced_errors = 0
    if cfg.teacher_forcing:
        end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
        for batch in length_matched(problems, engine, task, cfg.batch):
            forced = [engine.tokenizer.encode(p.response, add_special_tokens=False) + [end] for _, p in batch]
            longest = SamplingParams(max_tokens=max(len(f) for f in forced), temperature=0.0)
            forced_results = generate_batch(engine, [ids for ids, _ in batch], settings, longest, forced=forced)
            forced_tokens += sum(len(f) for f in forced)
            forced_errors += sum(r.forced_errors for r in forced_results)
    return Cell(
        method=method, budget=budget, problems=n, correct=correct,
        mean_peak_kv_tokens=sum(r.metrics.peak_retained_tokens for r in results) / n,
        mean_kv_bytes_peak=sum(r.metrics.peak_retained_tokens for r in results) / n * engine.kv_bytes_per_token,
        mean_logical_tokens=sum(r.metrics.logical_tokens for r in results) / n,
        seconds=time.perf_counter() - start,
        forced_tokens=forced_tokens, forced_errors=forced_errors,
    )


def length_matched(problems, engine, task, batch: int) -> list[list[tuple[list[int], object]]]:
    """Batches of (prompt ids, problem) whose prompts have one length each, as batched generation needs.
    Equal-length prompts (the lagged sum) batch as they are; otherwise the problems are sorted by prompt length, cut
    into `batch`-sized groups, and each shorter prompt gets filler prose up to its group's longest (task.pad_to);
    one that cannot be hit exactly runs alone. Deterministic, so every method sees the same prompts."""
    ids = [engine.encode_prompt(p.prompt) for p in problems]
    if len({len(x) for x in ids}) <= 1:
        pairs = list(zip(ids, problems))
        return [pairs[i:i + batch] for i in range(0, len(pairs), batch)]
    order = sorted(range(len(problems)), key=lambda i: len(ids[i]))
    batches = []
    for g in range(0, len(order), batch):
        group = order[g:g + batch]
        target = max(len(ids[i]) for i in group)
        same, alone = [], []
        for i in group:
            p = task.pad_to(problems[i], target, lambda text: len(engine.encode_prompt(text)))
            if p is None:
                alone.append([(ids[i], problems[i])])
            else:
                same.append((engine.encode_prompt(p.prompt), p))
        batches += ([same] if same else []) + alone
    return batches


def _cell_job(args) -> dict:
    cfg, method, budget = args
    return asdict(run_cell(cfg, method, budget))


def run_eval(cfg: EvalConfig, methods, budgets, jobs: int = 1, on_cell=None) -> list[Cell]:
    """Every (method, budget) cell, full attention once; on_cell(cell, cells so far) after each one finishes."""
    tasks = [(cfg, "full", None)] if "full" in methods else []
    tasks += [(cfg, m, b) for b in budgets for m in methods if m != "full"]
    cells: list[Cell] = []

    def done(cell: Cell) -> None:
        cells.append(cell)
        if on_cell is not None:
            on_cell(cell, cells)

    if jobs <= 1:
        for t in tasks:
            done(run_cell(*t))
        return cells
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(min(jobs, len(tasks))) as pool:
        for row in pool.imap_unordered(_cell_job, tasks):
            done(Cell(**row))
    return cells


def describe(c: Cell) -> str:
    lo, hi = c.interval()
    budget = "full" if c.budget is None else f"B={c.budget}"
    return (f"{c.method:13s} {budget:7s} {100 * c.accuracy:5.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] "
            f"n={c.problems} peak KV {c.mean_peak_kv_tokens:.0f} tok, {c.seconds:.0f} s"
            + (f", per-token error {100 * c.token_error_rate:.2f}% (teacher forcing)" if c.forced_tokens else ""))


def fresh_folder(prefix: str = "triattn-eval", parent: Path | None = None) -> Path:
    """A folder name not used yet: ./PREFIX-DATE-TIME (with a counter when taken)."""
    parent = Path.cwd() if parent is None else parent
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        folder = parent / (f"{prefix}-{stamp}" + (f"-{n}" if n else ""))
        if not folder.exists():
            return folder
    raise UserError(f"no free {prefix}-{stamp}-N folder name in {parent}")


def write_results(cells: list[Cell], cfg: EvalConfig, out: Path, command: str) -> None:
    from .files import write_atomic

    data = {"config": asdict(cfg), "command": command,
            "cells": [dict(asdict(c), accuracy=c.accuracy, interval95=c.interval(),
                           **({"token_error_rate": c.token_error_rate} if c.forced_tokens else {})) for c in cells]}
    write_atomic(out / "fidelity.json", json.dumps(data, indent=1))
    write_atomic(out / "fidelity.md", markdown_table(cells, cfg, command))


def markdown_table(cells: list[Cell], cfg: EvalConfig, command: str) -> str:
    budgets = sorted({c.budget for c in cells if c.budget is not None})
    methods = [m for m in DEFAULT_METHODS if any(c.method == m for c in cells if c.budget is not None)]
    full = next((c for c in cells if c.method == "full"), None)
    typical = full.mean_logical_tokens if full else None
    head = "| method | " + " | ".join(
        f"B={b}" + (f" ({typical / b:.0f}x)" if typical else "") for b in budgets) + " |"
    lines = [head, "|---" * (len(budgets) + 1) + "|"]
    for m in methods:
        row = [f"| {m} "]
        for b in budgets:
            c = next((c for c in cells if c.method == m and c.budget == b), None)
            if c is None:
                row.append("| – ")
            else:
                lo, hi = c.interval()
                row.append(f"| {100 * c.accuracy:.1f}% [{100 * lo:.0f}–{100 * hi:.0f}] ")
        lines.append("".join(row) + "|")
    notes = [f"n = {cells[0].problems} held-out problems per cell; [95 % Wilson interval]; greedy; "
             f"window {cfg.window}, sinks {cfg.sinks}, divide length {cfg.divide_length}, "
             f"pruning mode {cfg.pruning_mode}, prompt protection {'on' if cfg.protect_prefill else 'off'}, "
             f"TriAttention offsets up to {getattr(cfg, 'max_offset', 65536)}."]
    if full:
        lo, hi = full.interval()
        notes.append(f"Full attention: {100 * full.accuracy:.1f}% [{100 * lo:.0f}–{100 * hi:.0f}], "
                     f"mean sequence {full.mean_logical_tokens:.0f} tokens (the compression ratios above are of this).")
    notes.append(f"Command: `{command}`")
    text = "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
    if any(c.forced_tokens for c in cells):
        text += "\n" + forced_table(cells, budgets, methods, full)
    return text


def forced_table(cells: list[Cell], budgets: list[int], methods: list[str], full: Cell | None) -> str:
    """Per-token error under teacher forcing: each reference response fed token by token under the method's
    compression; the share of its tokens that greedy decoding would not have produced."""
    rate = lambda c: "– " if c is None or not c.forced_tokens else f"{100 * c.token_error_rate:.2f}% "  # noqa: E731
    lines = ["| per-token error (teacher forcing) | " + " | ".join(f"B={b}" for b in budgets) + " |",
             "|---" * (len(budgets) + 1) + "|"]
    for m in methods:
        row = [f"| {m} "] + [f"| {rate(next((c for c in cells if c.method == m and c.budget == b), None))}"
                             for b in budgets]
        lines.append("".join(row) + "|")
    note = "Each held-out problem's reference response is fed token by token under each method's compression; the rate"
    note += " is the share of its tokens that greedy decoding would not have chosen."
    if full is not None and full.forced_tokens:
        note += f" Full attention: {100 * full.token_error_rate:.2f}% of {full.forced_tokens} tokens."
    return "\n".join(lines) + "\n\n" + note + "\n"


def plot(json_path: Path, png_path: Path) -> None:
    """Accuracy vs budget and vs peak KV memory, one line per method, with the 95 % intervals."""
    try:
        data = json.loads(Path(json_path).read_bytes().decode("utf-8"))
        cells = data["cells"]
        for c in cells:  # every field the plot reads, with the types it needs
            float(c["accuracy"]), float(c["mean_kv_bytes_peak"]), float(c["interval95"][1]), str(c["method"])
            c["budget"] is None or int(c["budget"]), int(c["problems"])
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{json_path}: not a fidelity results file ({type(e).__name__}: {e})") from None
    if not cells:
        raise UserError(f"{json_path}: holds no results to plot")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("the plot needs matplotlib: pip install matplotlib "
                        "(or install triattn with its eval extra: pip install -e \".[torch,eval]\")") from None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    full = next((c for c in cells if c["method"] == "full"), None)
    for m in DEFAULT_METHODS:
        rows = sorted((c for c in cells if c["method"] == m and c["budget"] is not None), key=lambda c: c["budget"])
        if not rows:
            continue
        acc = [100 * c["accuracy"] for c in rows]
        err = [[100 * (c["accuracy"] - c["interval95"][0]) for c in rows],
               [100 * (c["interval95"][1] - c["accuracy"]) for c in rows]]
        axes[0].errorbar([c["budget"] for c in rows], acc, yerr=err, marker="o", capsize=3, label=m)
        axes[1].errorbar([c["mean_kv_bytes_peak"] / 2**20 for c in rows], acc, yerr=err, marker="o", capsize=3,
                         label=m)
    if full:
        for ax in axes:
            ax.axhline(100 * full["accuracy"], color="black", linestyle="--", label="full attention")
        axes[1].axvline(full["mean_kv_bytes_peak"] / 2**20, color="grey", linestyle=":", label="full KV (mean peak)")
    axes[0].set(xscale="log", xlabel="KV budget (tokens per layer and KV head)", ylabel="accuracy (%)",
                title="accuracy vs budget")
    axes[1].set(xscale="log", xlabel="peak KV memory (MiB, mean per problem)", ylabel="accuracy (%)",
                title="accuracy vs KV memory")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_ylim(-2, 102)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"demo model, {cells[0]['problems']} held-out problems per point (95 % Wilson intervals)")
    fig.tight_layout()
    from .files import atomic_path

    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
