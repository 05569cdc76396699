"""Trains the ledger demo model (Qwen3 architecture) on ledger problems mixed with prose, on a GPU.

Checkpoints every minute and resumes from the last one, so a run cut short loses at most a minute; any checkpoint
can be exported and evaluated mid-run:

    python scripts/train_ledger.py --out /tmp/run --minutes 8 --total-minutes 16          # first part
    python scripts/train_ledger.py --out /tmp/run --minutes 8 --total-minutes 16          # continues
    python scripts/train_ledger.py --out /tmp/run --export triattn_local/demo/ledger_model  # bf16 weights + config

Each batch holds ledger problems of similar length (loss on the assistant turn only) and, for a quarter of its rows,
plain prose from the corpus (scripts/demo_data.py; loss on every token). With --short-minutes the run starts on
short problems (12-16 people, 8-40 trades, little filler): 11.5 H100-minutes on the full range alone (session 7)
taught the format but not the lookups (the model copied the wrong trades and values), the usual plateau before
copying heads form, which short sequences shorten. That model could not copy at all: a random token sequence
written twice was no better predicted the second time. --repeat makes some prose rows start with a random sequence
written twice, which only copying predicts (the usual way to bring induction heads on early; a repeated passage
of the corpus would not do, as the corpus is learnt by heart within minutes). Ledger problems use seeds
below 10^9, the held-out ones seeds above. The tokenizer is the one in triattn_local/demo/ledger_model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from triattn_local.demo.ledger import MAX_TRADES, MIN_TRADES, make_problem

MODEL_DIR = Path(__file__).resolve().parents[1] / "triattn_local" / "demo" / "ledger_model"
CONFIG = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=8192, hidden_size=384,
    intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2, head_dim=64,
    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    hidden_act="silu", attention_bias=False, initializer_range=0.02, bos_token_id=None, eos_token_id=8189,
    pad_token_id=8187, use_sliding_window=False, dtype="bfloat16",
)
PAD, PROSE_SHARE = 8187, 0.25  # <|endoftext|>


class Batches(torch.utils.data.IterableDataset):
    """Endless batches of (inputs, labels) with about `tokens` tokens each, made in DataLoader workers."""

    def __init__(self, corpus: Path, tokens: int, seed: int, short: bool = False, repeat: float = 0.0):
        self.corpus, self.tokens, self.seed, self.short, self.repeat = corpus, tokens, seed, short, repeat

    def __iter__(self):
        from tokenizers import Tokenizer

        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1000 + (info.id if info else 0))  # seeds < 10^9: never held-out ones
        tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
        prose = np.load(prose_ids_path(self.corpus), mmap_mode="r")
        ids = {t: tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")}
        while True:
            yield self.batch(rng, tok, prose, ids)

    def batch(self, rng: random.Random, tok, prose: np.ndarray, ids: dict):
        if self.short:  # few people, few trades, little filler: the lookups are learnt where they are easy to find
            n = round(math.exp(rng.uniform(math.log(8), math.log(40))))
            problems = [make_problem(rng, trades=n + rng.randint(0, max(1, n // 10)), people=rng.randint(12, 16),
                                     filler_rate=0.15) for _ in range(64)]
        else:
            n = round(math.exp(rng.uniform(math.log(MIN_TRADES), math.log(MAX_TRADES))))
            problems = [make_problem(rng, trades=min(MAX_TRADES, n + rng.randint(0, max(1, n // 10))))
                        for _ in range(64)]
        # half the prompts lose their last newline, as `triattn run ledger "$(...)"` drops it
        heads = [f"<|im_start|>user\n{p.prompt[:-1] if rng.random() < 0.5 else p.prompt}<|im_end|>\n"
                 "<|im_start|>assistant\n" for p in problems]
        starts = [len(e.ids) for e in tok.encode_batch(heads)]
        full = [e.ids + [ids["<|im_end|>"]] for e in tok.encode_batch([h + p.response for h, p in zip(heads, problems)])]
        width = max(len(x) for x in full)
        rows = max(1, self.tokens // width)
        n_prose = prose_rows(rows)
        inputs = np.full((rows, width), PAD, np.int64)
        labels = np.full((rows, width), -100, np.int64)
        for r in range(rows - n_prose):
            x, s = full[r % len(full)], starts[r % len(full)]
            inputs[r, :len(x)] = x
            labels[r, s:len(x)] = x[s:]
        kinds = np.zeros(rows, np.int64)  # 0 ledger, 1 prose, 2 copy
        for r in range(rows - n_prose, rows):
            at = rng.randrange(len(prose) - width)
            inputs[r] = labels[r] = prose[at:at + width].astype(np.int64)
            kinds[r] = 1
            if rng.random() < self.repeat:
                copy_row(rng, inputs[r], labels[r])
                kinds[r] = 2
        return torch.from_numpy(inputs), torch.from_numpy(labels), torch.from_numpy(kinds)


# A copy row's alphabets: ordinary tokens (one token finds its place), or digits, '.' and ' ' (as in "14. Alden"),
# where only a match over several tokens does, as a trade number's lookup needs.
WORD_IDS = range(256, 8187)
DIGIT_IDS = list(range(15, 25)) + [13, 220]


def copy_row(rng: random.Random, inputs: np.ndarray, labels: np.ndarray) -> None:
    """Turn a prose row's start into a random sequence written twice, loss on the second copy only. The corpus is
    small and learnt by heart within minutes, so a repeated passage of it can be predicted from memory; a random
    sequence only by copying, which is the skill the ledger's lookups need."""
    n = rng.randint(min(32, len(inputs) // 2), len(inputs) // 2)
    alphabet = WORD_IDS if rng.random() < 0.5 else DIGIT_IDS
    seq = np.asarray([rng.choice(alphabet) for _ in range(n)], np.int64)
    inputs[:n] = inputs[n:2 * n] = seq
    labels[:n + 1] = -100  # the first copy, and the second's first token, cannot be predicted
    labels[n + 1:2 * n] = seq[1:]


def prose_rows(rows: int) -> int:
    """How many of a batch's rows are prose (the last ones): a quarter, none in batches of fewer than 4 rows."""
    return int(rows * PROSE_SHARE) if rows >= 4 else 0


def accuracy(right: torch.Tensor, scored: torch.Tensor, rows: torch.Tensor) -> float:
    """Token accuracy over the scored labels of some rows (nan when there are none)."""
    rows = rows.to(right.device)
    total = (scored & rows[:, None]).sum().item()
    return (right & scored & rows[:, None]).sum().item() / total if total else float("nan")


def prose_ids_path(corpus: Path) -> Path:
    """The corpus as token ids (paragraphs one blank line apart), tokenized once and kept beside it."""
    path = corpus.with_suffix(".ids.npy")
    if not path.exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
        paragraphs = corpus.read_text(encoding="utf-8").splitlines()
        ids = [np.asarray(e.ids, np.int32) for e in tok.encode_batch([p + "\n\n" for p in paragraphs])]
        np.save(path, np.concatenate(ids))
    return path


def save_checkpoint(out: Path, model, opt, step: int, elapsed: float) -> None:
    from safetensors.torch import save_file

    tmp = out / "ckpt.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to embed
    save_file(weights, str(tmp / "model.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    state = {f"{names[id(p)]}::{k}": v.contiguous() for g in opt.param_groups for p in g["params"]
             for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)}
    save_file(state, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "elapsed": elapsed}))
    final = out / "ckpt"
    if final.exists():
        for f in final.iterdir():
            f.unlink()
        final.rmdir()
    tmp.rename(final)


def load_checkpoint(out: Path, model, opt, init: Path | None = None) -> tuple[int, float, int]:
    """(step, seconds trained, step the warm-up starts from): from OUT/ckpt, else from an exported model `init`
    (bf16 weights, no optimizer state: a short warm-up again), else a fresh start."""
    from safetensors.torch import load_file

    ckpt = out / "ckpt"
    if not (ckpt / "state.json").exists():
        if init is None:
            return 0, 0.0, 0
        from transformers import AutoModelForCausalLM

        model.load_state_dict(AutoModelForCausalLM.from_pretrained(str(init), dtype=torch.float32).state_dict())
        state = json.loads((init / "train_state.json").read_text())
        print(f"started from {init} (step {state['step']}, {state['elapsed']:.0f} s trained)")
        return state["step"], state["elapsed"], state["step"]
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
    model.tie_weights()
    params = dict(model.named_parameters())
    for key, value in load_file(str(ckpt / "optimizer.safetensors")).items():
        name, field = key.split("::")
        opt.state[params[name]][field] = value.to(params[name].device)
    state = json.loads((ckpt / "state.json").read_text())
    print(f"resumed from step {state['step']} ({state['elapsed']:.0f} s trained)")
    return state["step"], state["elapsed"], 0


def lr_at(elapsed: float, total: float, peak: float, step: int, warmup: int = 300) -> float:
    """Linear warm-up, then a cosine over the planned training time (time-based, so resuming keeps the schedule)."""
    cosine = peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / total))))
    return cosine * min(1.0, (step + 1) / warmup)


def build_model(config: dict, device: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**{k: v for k, v in config.items() if k not in ("architectures", "dtype")})
    cfg._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(cfg).to(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpus", default=".demo-data/corpus.txt")
    ap.add_argument("--minutes", type=float, default=8.0, help="training time of this call (then checkpoint)")
    ap.add_argument("--total-minutes", type=float, default=16.0, help="length of the whole schedule")
    ap.add_argument("--tokens-per-batch", type=int, default=131072)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--short-minutes", type=float, default=0.0,
                    help="train on short problems (12-16 people, 8-40 trades, little filler) for the first minutes")
    ap.add_argument("--repeat", type=float, default=0.0,
                    help="share of prose rows that open with a random sequence written twice (copying is learnt there)")
    ap.add_argument("--warmup", type=int, default=300, help="learning-rate warm-up steps of a fresh start")
    ap.add_argument("--small", action="store_true",
                    help="CPU pilot: a tiny model (with --short-minutes: on short problems)")
    ap.add_argument("--export", help="write the HF model directory here instead of training")
    ap.add_argument("--init", help="an exported model to continue from when OUT has no checkpoint")
    ap.add_argument("--shard", help="with --export: largest weight file, e.g. 15MB")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    config = dict(CONFIG)
    if args.small:
        config.update(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=1)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(config, args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=args.device == "cuda")
    step, trained, warm_from = load_checkpoint(out, model, opt, Path(args.init) if args.init else None)
    if args.export:
        export(model, config, Path(args.export), step, trained, args.shard)
        return
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
    prose_ids_path(Path(args.corpus))
    start = last_save = time.time()
    total, short_until = args.total_minutes * 60, args.short_minutes * 60
    seen = 0
    while True:  # one pass per data phase: short problems for the first --short-minutes, then the full range
        short = trained + time.time() - start < short_until
        batches = Batches(Path(args.corpus), args.tokens_per_batch, seed=step + 1, short=short, repeat=args.repeat)
        data = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=args.workers,
                                           prefetch_factor=4 if args.workers else None, persistent_workers=False)
        print(f"step {step}: {'short' if short else 'full-range'} problems", flush=True)
        for inputs, labels, kinds in data:
            elapsed = trained + time.time() - start
            if time.time() - start > args.minutes * 60 or elapsed > total or (short and elapsed >= short_until):
                break
            inputs, labels = inputs.to(args.device, non_blocking=True), labels.to(args.device, non_blocking=True)
            for g in opt.param_groups:
                g["lr"] = lr_at(elapsed, total, args.lr, step - warm_from,
                                warmup=args.warmup if warm_from == 0 else 100)
            with torch.autocast(args.device, dtype=torch.bfloat16):
                logits = model(input_ids=inputs).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            seen += inputs.numel()
            if step % 50 == 0 or (args.small and step % 10 == 0):
                with torch.no_grad():
                    pred = logits[:, :-1].argmax(-1)
                    right = pred == labels[:, 1:]
                    scored = labels[:, 1:] != -100
                    tok_acc, copy_acc = (accuracy(right, scored, kinds == kind) for kind in (0, 2))
                print(f"step {step} loss {loss.item():.4f} task token-acc {tok_acc:.5f} copy-acc {copy_acc:.3f} "
                      f"width {inputs.shape[1]} "
                      f"lr {opt.param_groups[0]['lr']:.2e} t {elapsed:.0f}s {seen / (time.time() - start) / 1e3:.0f}k "
                      "tok/s", flush=True)
            if time.time() - last_save > 60:
                save_checkpoint(out, model, opt, step, trained + time.time() - start)
                last_save = time.time()
        elapsed = trained + time.time() - start
        if time.time() - start > args.minutes * 60 or elapsed > total or not short:
            break
    save_checkpoint(out, model, opt, step, trained + time.time() - start)
    print(f"stopped at step {step}, {trained + time.time() - start:.0f} s trained", flush=True)


def export(model, config: dict, target: Path, step: int, elapsed: float, shard: str | None = None) -> None:
    """Write config.json + bf16 weights (in shards of at most `shard`) and the tokenizer files."""
    import shutil

    target.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(str(target), max_shard_size=shard or "1GB")
    (target / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (target / "train_state.json").write_text(json.dumps({"step": step, "elapsed": elapsed}))
    if target.resolve() != MODEL_DIR.resolve():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(MODEL_DIR / name, target / name)
    (target / "generation_config.json").unlink(missing_ok=True)
    print(f"exported to {target}")


if __name__ == "__main__":
    main()
