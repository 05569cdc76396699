"""Trains the demo reasoning model (Qwen3 architecture) on the lagged-sum task, on a GPU.

Checkpoints every minute and resumes from the last checkpoint, so a run cut short loses at most a minute:

    python scripts/train_demo.py --out /tmp/demo-run --minutes 9      # one command fits in 10 minutes
    python scripts/train_demo.py --out /tmp/demo-run --minutes 9      # continues where it stopped
    python scripts/train_demo.py --out /tmp/demo-run --export triattn_local/demo/model

The data are drawn from triattn_local.demo.task with seeds < 10^9 (held-out problems use others). Loss is on the
assistant turn only. The exported weights are bf16 (≈ 10 MB), the tokenizer is the one in triattn_local/demo/model.
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

from triattn_local.demo.task import MAX_STEPS, MIN_STEPS, held_out_problems, make_problem, parse_answer

MODEL_DIR = Path(__file__).resolve().parents[1] / "triattn_local" / "demo" / "model"
CONFIG = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=384, hidden_size=256,
    intermediate_size=768, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    hidden_act="silu", attention_bias=False, initializer_range=0.02, bos_token_id=1, eos_token_id=4,
    pad_token_id=2, use_sliding_window=False, dtype="bfloat16",
)
SEED = 0


class Encoder:
    """Character-level ids from the demo tokenizer's vocabulary (the same ids as its tokenizer.json)."""

    def __init__(self, model_dir: Path = MODEL_DIR):
        vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
        self.table = np.zeros(128, dtype=np.int64)
        for code in range(128):
            ch = "▁" if code == 32 else chr(code)
            self.table[code] = vocab.get(ch, vocab.get(f"<0x{code:02X}>", 0))
        self.special = {t: vocab[t] for t in ("<|im_start|>", "<|im_end|>", "<think>", "</think>")}

    def text(self, s: str) -> np.ndarray:
        return self.table[np.frombuffer(s.encode("ascii"), dtype=np.uint8)]

    def conversation(self, prompt: str, response: str | None) -> tuple[np.ndarray, int]:
        """(ids, start of the assistant turn's content) as the chat template lays out the conversation."""
        s = self.special
        parts = [[s["<|im_start|>"]], self.text("user\n" + prompt), [s["<|im_end|>"]], self.text("\n"),
                 [s["<|im_start|>"]], self.text("assistant\n")]
        start = sum(len(p) for p in parts)
        if response is not None:
            think, _, rest = response.partition("</think>")
            parts += [[s["<think>"]], self.text(think[len("<think>"):]), [s["</think>"]], self.text(rest),
                      [s["<|im_end|>"]]]
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]), start


def make_batch(enc: Encoder, rng: random.Random, tokens_per_batch: int, device: str):
    """Problems of similar length, padded; labels are -100 outside the assistant turn."""
    low = rng.randint(MIN_STEPS, MAX_STEPS)
    seqs = []
    approx = 10 * (low + 10) + 400
    for _ in range(max(1, tokens_per_batch // approx)):
        p = make_problem(rng, steps=min(MAX_STEPS, low + rng.randint(0, 10)))
        ids, start = enc.conversation(p.prompt, p.response)
        seqs.append((ids, start))
    width = max(len(ids) for ids, _ in seqs)
    inputs = np.full((len(seqs), width), 2, dtype=np.int64)
    labels = np.full((len(seqs), width), -100, dtype=np.int64)
    for r, (ids, start) in enumerate(seqs):
        inputs[r, :len(ids)] = ids
        labels[r, start:len(ids)] = ids[start:]
    return torch.from_numpy(inputs).to(device), torch.from_numpy(labels).to(device)


def save_checkpoint(out: Path, model, opt, step: int, rng: random.Random, elapsed: float) -> None:
    from safetensors.torch import save_file

    tmp = out / "ckpt.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to embed
    save_file(weights, str(tmp / "model.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    opt_tensors = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value):
                    opt_tensors[f"{names[id(p)]}::{key}"] = value.contiguous()
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "elapsed": elapsed, "rng": repr(rng.getstate())}))
    final = out / "ckpt"
    if final.exists():
        for f in final.iterdir():
            f.unlink()
        final.rmdir()
    tmp.rename(final)


def load_checkpoint(out: Path, model, opt):
    import ast

    from safetensors.torch import load_file

    ckpt = out / "ckpt"
    if not (ckpt / "state.json").exists():
        return 0, random.Random(SEED), 0.0
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
    model.tie_weights()
    saved = load_file(str(ckpt / "optimizer.safetensors"))
    params = dict(model.named_parameters())
    for key, value in saved.items():
        name, field = key.split("::")
        opt.state[params[name]][field] = value.to(params[name].device)
    state = json.loads((ckpt / "state.json").read_text())
    rng = random.Random()
    rng.setstate(ast.literal_eval(state["rng"]))
    print(f"resumed from step {state['step']} ({state['elapsed']:.0f} s trained)")
    return state["step"], rng, state["elapsed"]


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))


@torch.no_grad()
def greedy_accuracy(model, enc: Encoder, count: int, device: str, batch: int = 128) -> float:
    """Held-out problems solved with greedy decoding and full attention (batched, left-padded)."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    problems = held_out_problems(count)
    correct = 0
    for i in range(0, count, batch):
        chunk = problems[i:i + batch]
        prompts = [enc.conversation(p.prompt, None)[0] for p in chunk]
        width = max(len(x) for x in prompts)
        ids = torch.full((len(chunk), width), 2, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, x in enumerate(prompts):
            ids[r, width - len(x):] = torch.from_numpy(x)
            mask[r, width - len(x):] = 1
        out = model.generate(ids.to(device), attention_mask=mask.to(device), generation_config=GenerationConfig(
            max_new_tokens=10 * MAX_STEPS + 40, do_sample=False, eos_token_id=4, pad_token_id=2))
        for r, p in enumerate(chunk):
            correct += parse_answer(tokenizer.decode(out[r, width:].tolist())) == p.answer
    return correct / count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=9.0, help="training time of this call (then checkpoint)")
    ap.add_argument("--total-minutes", type=float, default=9.0, help="length of the whole schedule")
    ap.add_argument("--tokens-per-batch", type=int, default=160_000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval", type=int, default=256, help="held-out problems for the final greedy check")
    ap.add_argument("--export", help="write the HF model directory here instead of training")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from transformers import Qwen3Config, Qwen3ForCausalLM

    device = args.device
    torch.manual_seed(SEED)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in CONFIG.items() if k not in ("architectures", "dtype")}))
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05, fused=device == "cuda")
    step, rng, trained = load_checkpoint(out, model, opt)
    enc = Encoder()
    if args.export:
        export(model, Path(args.export))
        return
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    # time-based schedule: estimate the total steps from the measured speed
    start, last_save, total_steps = time.time(), time.time(), None
    while True:
        elapsed = trained + time.time() - start
        if time.time() - start > args.minutes * 60 or elapsed > args.total_minutes * 60:
            break
        inputs, labels = make_batch(enc, rng, args.tokens_per_batch, device)
        if step == 20:
            t20 = time.time()
        if step == 60:
            per_step = (time.time() - t20) / 40
            total_steps = int(args.total_minutes * 60 / per_step)
            print(f"{per_step * 1000:.0f} ms/step → about {total_steps} steps")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total_steps or 10**6, args.lr)
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            with torch.no_grad():
                pred = logits[:, :-1].argmax(-1)
                mask = labels[:, 1:] != -100
                wrong = ((pred != labels[:, 1:]) & mask).sum(1)
                tok_acc = 1 - wrong.sum().item() / mask.sum().item()
                seq_acc = (wrong == 0).float().mean().item()
            print(f"step {step} loss {loss.item():.4f} token-acc {tok_acc:.5f} seq-acc {seq_acc:.3f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} t {elapsed:.0f}s", flush=True)
        if time.time() - last_save > 60:
            save_checkpoint(out, model, opt, step, rng, trained + time.time() - start)
            last_save = time.time()
    save_checkpoint(out, model, opt, step, rng, trained + time.time() - start)
    model.eval()
    if args.eval:
        print(f"greedy accuracy on {args.eval} held-out problems: {greedy_accuracy(model, enc, args.eval, device):.3f}")


def export(model, target: Path) -> None:
    """Write config.json + bf16 model.safetensors next to the tokenizer files."""
    target.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(str(target), safe_serialization=True)
    (target / "config.json").write_text(json.dumps(CONFIG, indent=1))
    (target / "generation_config.json").unlink(missing_ok=True)
    print(f"exported to {target}")


if __name__ == "__main__":
    main()
