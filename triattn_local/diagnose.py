"""Is a model a fair test of KV eviction? Attention and query measures on solved problems (teacher forcing).

For each layer, averaged over query heads and the queries of the assistant turn (see
shared notes "fidelity-diagnostics"):
- effective keys: exp(entropy) of a query's attention over the keys it sees;
- top-64 share: attention mass on its 64 most-attended keys; sink mass: on the first 4 tokens;
- oracle retention at budget B: every `next_n` queries (a compression round), keep per KV head the B older keys the
  next `next_n` queries attend to most, and measure the share of those queries' attention to older keys that the
  kept ones hold; random keeping (B random older keys) and recency (the B most recent) for comparison;
- query concentration per (layer, head): the energy-weighted mean resultant length of the pre-RoPE queries (as
  TriAttentionStats.concentration), on the same queries.
Also the task's lookup distances (tokens from a trade line back to where each value it needs was last written), so
one can see that no recent window holds every fact an answer needs.

    python -m triattn_local.diagnose MODEL_DIR --problems 4 --budgets 256,512,1024 --out diag.json
    python -m triattn_local.diagnose MODEL_DIR --show-errors 8 --max-trades 60   # what a checkpoint gets wrong
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

SINKS = 4
TOP = 64


def conversation(tokenizer, problem) -> tuple[list[int], int]:
    """Token ids of prompt + reference response as the chat template lays them out, and where the response starts."""
    head = f"<|im_start|>user\n{problem.prompt}<|im_end|>\n<|im_start|>assistant\n"
    start = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    ids = tokenizer(head + problem.response + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return ids, start


def lookup_distances(tokenizer, problem) -> list[int]:
    """For each trade line, tokens back to where each person's current value was last written (fact or line)."""
    head = f"<|im_start|>user\n{problem.prompt}<|im_end|>\n<|im_start|>assistant\n"
    text = head + problem.response
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = np.array([a for a, _ in enc["offset_mapping"]])
    tok_at = lambda ch: int(np.searchsorted(starts, ch, side="right") - 1)  # noqa: E731
    last = {}
    for m in re.finditer(r"(\w+) holds \d", problem.prompt):
        last[m.group(1)] = tok_at(len("<|im_start|>user\n") + m.start())
    out = []
    base = len(head)
    for m in re.finditer(r"^\d+\. \w+ gives \d to \w+\. (\w+) \d-\d=\d\. (\w+) \d\+\d=\d\.$|^Recap: (.*)\.$",
                         problem.response, re.M):
        at = tok_at(base + m.start())
        if m.group(3):  # a recap: reads each value shown
            people = [p.split(" ")[0] for p in m.group(3).split(", ")]
        else:
            people = [m.group(1), m.group(2)]
        for p in people:
            if p in last:
                out.append(at - last[p])
        if not m.group(3):
            for p in people:
                last[p] = at
    return out


def layer_measures(attn, start: int, budgets: list[int], next_n: int, kv_heads: int, rng) -> dict:
    """Measures of one layer's attention [H, T, T] (rows: queries; float32 probabilities)."""
    import torch

    H, T, _ = attn.shape
    q = attn[:, start:, :]  # the response's queries
    ent = -(q.clamp_min(1e-30).log() * q).sum(-1)
    res = {
        "effective_keys": float(ent.exp().mean()),
        "top64_share": float(q.topk(min(TOP, T), dim=-1).values.sum(-1).mean()),
        "sink_mass": float(q[..., :SINKS].sum(-1).mean()),
        "oracle": {}, "random": {}, "recent": {},
    }
    group = H // kv_heads
    for B in budgets:
        kept = {"oracle": [], "random": [], "recent": []}
        for r in range(start, T - next_n + 1, next_n):
            if r <= B:
                continue
            future = attn[:, r:r + next_n, :r].sum(1)  # [H, r]: attention the next queries pay to older keys
            total = future.sum(-1)
            per_kv = future.view(kv_heads, group, r).sum(1)
            masks = {
                "oracle": torch.zeros(kv_heads, r, dtype=torch.bool, device=attn.device).scatter_(
                    1, per_kv.topk(B, -1).indices, True),
                "random": torch.zeros(kv_heads, r, dtype=torch.bool, device=attn.device).scatter_(
                    1, torch.stack([torch.from_numpy(rng.choice(r, B, replace=False)) for _ in range(kv_heads)]).to(
                        attn.device), True),
                "recent": torch.zeros(kv_heads, r, dtype=torch.bool, device=attn.device),
            }
            masks["recent"][:, r - B:] = True
            for name, m in masks.items():
                held = (future * m.repeat_interleave(group, 0)).sum(-1)
                kept[name].append(float((held / total).mean()))
        for name in kept:
            res[name][B] = float(np.mean(kept[name])) if kept[name] else None
    return res


def marked_errors(model_dir: str, problem, lines: int = 8, device: str = "cpu") -> tuple[str, float]:
    """A solved problem under teacher forcing: the first `lines` lines of the response with every token the model
    would not predict greedily written [expected|predicted], and the response's token accuracy. Shows at a glance
    which lookups a checkpoint has learnt (the trade copied from the prompt, a value from the facts, arithmetic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    ids, start = conversation(tokenizer, problem)
    with torch.no_grad():
        predicted = model(input_ids=torch.tensor([ids], device=device)).logits[0].argmax(-1).tolist()
    right = [predicted[i - 1] == ids[i] for i in range(start, len(ids))]
    pieces = []
    for i in range(start, len(ids)):
        expected = tokenizer.decode([ids[i]])
        if "".join(pieces).count("\n") >= lines:
            break
        pieces.append(expected if right[i - start] else f"[{expected}|{tokenizer.decode([predicted[i - 1]])}]")
    return "".join(pieces), float(np.mean(right))


def copying(logits_of, vocab: range, length: int = 200, trials: int = 4, seed: int = 0) -> dict:
    """Can the model copy? A random sequence of `length` tokens drawn from `vocab`, written twice: mean loss (nats)
    and greedy accuracy on each copy. Only copying predicts the second copy, so a model whose second-copy loss is no
    lower than its first has no induction heads, and cannot look a trade up in the prompt. logits_of: token ids
    [T] → logits [T, vocab size] (numpy)."""
    rng = np.random.default_rng(seed)
    first, second, right = [], [], []
    for _ in range(trials):
        seq = rng.integers(vocab.start, vocab.stop, size=length)
        ids = np.concatenate([seq, seq])
        logits = np.asarray(logits_of(ids), dtype=np.float64)[:-1]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll = -logp[np.arange(len(ids) - 1), ids[1:]]  # nll[i]: token i + 1
        first.append(nll[:length - 1].mean())
        second.append(nll[length:].mean())  # the second copy's tokens after its first
        right.append((logits.argmax(-1)[length:] == ids[length + 1:]).mean())
    return {"length": length, "trials": trials, "first_copy_nll": float(np.mean(first)),
            "second_copy_nll": float(np.mean(second)), "second_copy_accuracy": float(np.mean(right))}


def model_copying(model_dir: str, device: str = "cpu") -> dict:
    """copying() for a model directory, over its ordinary tokens (byte tokens and special tokens left out)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    vocab = model.config.vocab_size

    def logits_of(ids):
        with torch.no_grad():
            return model(input_ids=torch.as_tensor(ids, device=device)[None]).logits[0].float().cpu().numpy()

    return copying(logits_of, range(min(256, vocab // 4), vocab - 16))


def query_concentration(queries) -> np.ndarray:
    """Per head mean resultant length of pre-RoPE queries [N, H, D] (rotate-half pairs f and f + D/2)."""
    q = queries.double()
    d = q.shape[-1] // 2
    z = torch_complex(q[..., :d], q[..., d:])
    mean = z.mean(0).abs()  # [H, D/2]
    energy = z.abs().mean(0)
    return ((mean * energy).sum(-1) / (energy * energy).sum(-1).clamp_min(1e-30)).cpu().numpy()


def torch_complex(re_, im_):
    import torch

    return torch.complex(re_, im_)


def diagnose(model_dir: str, problems, budgets: list[int], next_n: int = 128, device: str = "cpu",
             seed: int = 0) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.to(device).eval()
    cfg = model.config
    captured: dict[int, object] = {}
    hooks = [layer.self_attn.q_norm.register_forward_hook(lambda mod, inp, out, i=i: captured.__setitem__(i, out))
             for i, layer in enumerate(model.model.layers)]
    rng = np.random.default_rng(seed)
    per_layer: list[list[dict]] = [[] for _ in range(cfg.num_hidden_layers)]
    queries: list[list] = [[] for _ in range(cfg.num_hidden_layers)]
    lengths, distances = [], []
    with torch.no_grad():
        for p in problems:
            ids, start = conversation(tokenizer, p)
            lengths.append(len(ids))
            distances += lookup_distances(tokenizer, p)
            out = model(input_ids=torch.tensor([ids], device=device), output_attentions=True)
            for i, a in enumerate(out.attentions):
                per_layer[i].append(layer_measures(a[0].float(), start, budgets, next_n, cfg.num_key_value_heads, rng))
                queries[i].append(captured[i][0, start:].float())  # [N, H, D]
            del out
    for h in hooks:
        h.remove()
    layers = []
    for i in range(cfg.num_hidden_layers):
        rows = per_layer[i]
        conc = query_concentration(torch.cat(queries[i]))
        entry = {k: float(np.mean([r[k] for r in rows])) for k in ("effective_keys", "top64_share", "sink_mass")}
        for name in ("oracle", "random", "recent"):
            entry[name] = {B: _mean([r[name][B] for r in rows]) for B in budgets}
        entry["concentration"] = conc.tolist()
        layers.append(entry)
    conc_all = np.concatenate([np.asarray(l["concentration"]) for l in layers])
    d = np.asarray(distances)
    return {
        "model": str(model_dir), "problems": len(problems), "mean_tokens": float(np.mean(lengths)),
        "next_n": next_n, "budgets": budgets, "layers": layers,
        "concentration_median": float(np.median(conc_all)),
        "oracle": {B: _mean([l["oracle"][B] for l in layers]) for B in budgets},
        "random": {B: _mean([l["random"][B] for l in layers]) for B in budgets},
        "recent": {B: _mean([l["recent"][B] for l in layers]) for B in budgets},
        "lookup_distance_quantiles": {q: float(np.quantile(d, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)},
        "lookups_beyond": {B: float((d > B).mean()) for B in budgets},
    }


def greedy_accuracy(model_dir: str, problems, device: str = "cpu", batch: int = 100) -> dict:
    """Full attention, greedy (transformers' generate): answers right, traces the checker passes, 95 % interval."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .demo.ledger import check, parse_answer
    from .eval import max_answer_tokens, wilson_interval
    from .demo import ledger

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    correct = traces = 0
    failures = []
    for i in range(0, len(problems), batch):
        chunk = problems[i:i + batch]
        prompts = [tokenizer(f"<|im_start|>user\n{p.prompt}<|im_end|>\n<|im_start|>assistant\n",
                             add_special_tokens=False)["input_ids"] for p in chunk]
        width = max(map(len, prompts))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, x in enumerate(prompts):
            ids[r, width - len(x):] = torch.tensor(x)
            mask[r, width - len(x):] = 1
        with torch.no_grad():
            out = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_answer_tokens(ledger), eos_token_id=eos, pad_token_id=pad)
        for r, p in enumerate(chunk):
            text = tokenizer.decode(out[r, width:], skip_special_tokens=True)
            correct += parse_answer(text) == p.answer
            errors = check(p, text)
            traces += not errors
            if errors and len(failures) < 20:
                failures.append(errors[:3])
    n = len(problems)
    return {"problems": n, "correct": correct, "accuracy": correct / n, "interval95": wilson_interval(correct, n),
            "traces_ok": traces, "failures": failures}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def markdown(d: dict) -> str:
    budgets = d["budgets"]
    pct = lambda x: "–" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    lines = [f"{d['problems']} problems, mean {d['mean_tokens']:.0f} tokens; rounds every {d['next_n']} queries; "
             f"query concentration median {d['concentration_median']:.3f}", "",
             "| layer | effective keys | top-64 share | sink mass | conc. median | "
             + " | ".join(f"oracle/random/recent B={B}" for B in budgets) + " |",
             "|---" * (5 + len(budgets)) + "|"]
    for i, l in enumerate(d["layers"]):
        lines.append(f"| {i} | {l['effective_keys']:.1f} | {pct(l['top64_share'])} | {pct(l['sink_mass'])} | "
                     f"{np.median(l['concentration']):.3f} | "
                     + " | ".join(f"{pct(l['oracle'][B])} / {pct(l['random'][B])} / {pct(l['recent'][B])}"
                                  for B in budgets) + " |")
    lines.append("| all | | | | | " + " | ".join(
        f"{pct(d['oracle'][B])} / {pct(d['random'][B])} / {pct(d['recent'][B])}" for B in budgets) + " |")
    q = d["lookup_distance_quantiles"]
    lines += ["", "Lookup distances (tokens back to the value a line needs): "
              + ", ".join(f"p{int(100 * k)} {v:.0f}" for k, v in q.items())
              + "; beyond each budget: " + ", ".join(f"B={B}: {pct(v)}" for B, v in d["lookups_beyond"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    import argparse

    from .demo.ledger import held_out_problems
    from .files import write_atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--budgets", default="256,512,1024")
    ap.add_argument("--next", type=int, default=128, help="queries per round (divide length)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-trades", type=int, default=None, help="only problems up to this many trades (CPU)")
    ap.add_argument("--accuracy", type=int, default=0, metavar="N",
                    help="also greedy full-attention accuracy on N held-out problems")
    ap.add_argument("--show-errors", type=int, default=0, metavar="LINES",
                    help="only print the first LINES lines of a held-out problem under teacher forcing, each token "
                         "the model gets wrong as [expected|predicted]")
    ap.add_argument("--copying", action="store_true",
                    help="only print how well the model copies a random sequence written twice (loss on each copy)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.copying:
        c = model_copying(args.model, args.device)
        print(f"a random {c['length']}-token sequence written twice ({c['trials']} trials): loss "
              f"{c['first_copy_nll']:.2f} nats on the first copy, {c['second_copy_nll']:.2f} on the second; "
              f"second copy greedy accuracy {c['second_copy_accuracy']:.3f}")
        return
    problems = held_out_problems(4 * args.problems + 40)
    if args.max_trades:
        problems = [p for p in problems if len(p.trades) <= args.max_trades]
    if args.show_errors:
        text, accuracy = marked_errors(args.model, problems[0], args.show_errors, args.device)
        print(f"token accuracy of the response under teacher forcing: {accuracy:.4f}\n{text}")
        return
    result = diagnose(args.model, problems[:args.problems], [int(b) for b in args.budgets.split(",")], args.next,
                      args.device)
    text = markdown(result)

    def save() -> None:
        if args.out:
            write_atomic(args.out, json.dumps(result, indent=1))
            write_atomic(Path(args.out).with_suffix(".md"), text)

    print(text, flush=True)  # before the (slow) accuracy run: a run cut short still reports the measures
    save()
    if args.accuracy:
        acc = greedy_accuracy(args.model, held_out_problems(args.accuracy), args.device)
        result["full_attention"] = acc
        lo, hi = acc["interval95"]
        line = (f"\nFull attention, greedy: {acc['correct']}/{acc['problems']} = {100 * acc['accuracy']:.1f}% "
                f"[95 % interval {100 * lo:.1f}–{100 * hi:.1f}]; traces without any error: {acc['traces_ok']}\n")
        print(line)
        text += line
        save()


if __name__ == "__main__":
    main()
