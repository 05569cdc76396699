"""int4 AWQ matmuls on the Qwen3-32B decode shapes: the split-K gemv and the dispatcher (int4_kernels) against a
bf16 torch matmul of the same [K, N], on a CUDA GPU.

    python benchmarks/int4_gemv.py [--m 1,16] [--shapes qkv,o,gate_up,down] [--reps 50] [--out results.json]

One line per (shape, M, method): µs per call and effective GB/s (bytes of the weights read: packed int4 + scales
+ zeros, or the bf16 matrix, over the time). Weights are random; each method cycles through enough copies of its
weights that they do not stay in L2 between calls (as in a decode step, where every layer's weights are read once).
Timed with CUDA events on a CUDA graph of --reps calls (the GPU's time, as a captured decode step runs them),
after a warm-up (which includes Triton's autotuning); each call includes awq_gemv's zeroing of its fp32 output and
the cast to bf16. Checks awq_linear (and with --sweep every gemv configuration) against the dequantized weight
first. Ends with a per-step estimate for --layers layers (qkv + o + gate_up + down per layer) and writes
everything as JSON to --out. About a minute on an H200 with the defaults (most of it compiling and autotuning).

Measured there (Triton 3.6, 2026-11-29), µs at M = 1: qkv 16, o 15, gate_up 53, down 29: 7.3 ms a step against
the 502 ms of the earlier tile kernel (removed), 15.8 ms of bf16 weights through cuBLAS and 3.4 ms of int4 weights at 4.8 TB/s.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

# (K, N) of each projection of Qwen3-32B: hidden 5120, 64 query heads and 8 KV heads of 128, intermediate 25600;
# q/k/v and gate/up fused, as the static model loads them.
SHAPES = {
    "qkv": (5120, (64 + 2 * 8) * 128),
    "o": (64 * 128, 5120),
    "gate_up": (5120, 2 * 25600),
    "down": (25600, 5120),
    "gate": (5120, 25600),  # gate or up alone, for comparison with unfused layers (not in the per-step sum)
}
STEP = ("qkv", "o", "gate_up", "down")
L2_BYTES = 60 * 2**20  # H200; several times this is cycled through per method
HBM_GBPS = 4800.0  # H200 datasheet, for the roofline line


def make_weights(k: int, n: int, group: int, copies: int, device: str):
    """`copies` random int4 AWQ weights [K, N] (the packed tensors) and their bytes per copy."""
    out = []
    for _ in range(copies):
        qweight = torch.randint(-2**31, 2**31 - 1, (k, n // 8), dtype=torch.int32, device=device)
        qzeros = torch.randint(-2**31, 2**31 - 1, (k // group, n // 8), dtype=torch.int32, device=device)
        scales = (torch.rand(k // group, n, device=device) * 0.01 + 0.001).to(torch.float16)
        out.append((qweight, qzeros, scales))
    qweight, qzeros, scales = out[0]
    nbytes = sum(t.numel() * t.element_size() for t in (qweight, qzeros, scales))
    return out, nbytes


def copies_for(nbytes: int) -> int:
    return max(2, math.ceil(3 * L2_BYTES / nbytes))


def time_calls(fn, args_list, reps: int, warmup: int = 2) -> float:
    """Mean µs per call of fn(*args) over `reps` calls cycling through args_list, after `warmup` calls of each
    (autotuning happens there). The calls are captured in one CUDA graph and timed on its replays, as the decode
    step runs them: what is measured is the GPU's time, not Python's launch overhead."""
    for args in args_list:
        for _ in range(warmup):
            fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(*args_list[i % len(args_list)])
    torch.cuda.synchronize()
    graph.replay()  # once untimed
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) * 1000 / (3 * reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,16", help="rows of x (comma-separated)")
    ap.add_argument("--shapes", default="qkv,o,gate_up,down", help=f"of {','.join(SHAPES)}")
    ap.add_argument("--methods", default="dispatch,gemv,matmul,old,bf16",
                    help="dispatch: int4_kernels.awq_linear; gemv: int4_kernels.awq_gemv (M ≤ 8); "
                         "matmul: int4_kernels.awq_matmul; bf16: x @ W in torch")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sweep", action="store_true",
                    help="also time awq_gemv in each of int4_kernels.GEMV_CONFIGS (method gemv[config])")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    from triattn_local.backends.torch import int4, int4_kernels

    ms = [int(v) for v in args.m.split(",")]
    methods = args.methods.split(",")
    fns = {
        "dispatch": int4_kernels.awq_linear,
        "gemv": int4_kernels.awq_gemv,
        "matmul": int4_kernels.awq_matmul,
    }
    methods = [name for name in methods if name in fns or name == "bf16"]
    dev = torch.device(args.device)
    props = torch.cuda.get_device_properties(dev)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {int4_kernels.triton.__version__}")
    results, t0 = [], time.time()
    for shape in args.shapes.split(","):
        k, n = SHAPES[shape]
        weights, nbytes = make_weights(k, n, args.group, copies_for(k * n // 2), args.device)
        gen = torch.Generator(device=dev).manual_seed(0)
        # correctness: the dispatcher against the dequantized weight in float32, once per shape and M
        w_ref = int4.dequantize(*weights[0], args.group)
        for m in ms:
            x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
            got = int4_kernels.awq_linear(x, *weights[0], args.group).float()
            want = x.float() @ w_ref
            rel = ((got - want).norm() / want.norm()).item()
            if not rel < 1e-2:
                raise SystemExit(f"{shape} M={m}: awq_linear is off, relative error {rel:.2e}")
            sweep = []
            if args.sweep and m <= 8:
                for c in int4_kernels.GEMV_CONFIGS:
                    name = f"gemv[{','.join(f'{key[0]}{v}' for key, v in c.kwargs.items())},w{c.num_warps}]"
                    fns[name] = lambda *a, _c=c: int4_kernels.awq_gemv(*a, config=_c)
                    sweep.append(name)
                    err = ((fns[name](x, *weights[0], args.group).float() - want).norm() / want.norm()).item()
                    if not err < 1e-2:
                        raise SystemExit(f"{shape} M={m}: {name} is off, relative error {err:.2e}")
            for method in methods + sweep:
                if method == "gemv" and m > 8:  # (its rows are unrolled; made for a few)
                    continue
                if method == "bf16":
                    wb = w_ref.to(torch.bfloat16)
                    bf16 = [(x, wb)] + [(x, torch.randn_like(wb)) for _ in range(copies_for(k * n * 2) - 1)]
                    us = time_calls(torch.matmul, bf16, args.reps)
                    read = k * n * 2
                    del bf16, wb
                else:
                    us = time_calls(fns[method], [(x, *w, args.group) for w in weights], args.reps)
                    read = nbytes
                row = dict(shape=shape, K=k, N=n, M=m, method=method, us=round(us, 2),
                           GBps=round(read / us / 1e3, 1), bytes=read, rel_err=rel if method == "dispatch" else None)
                results.append(row)
                print(f"{shape:8s} K={k:5d} N={n:5d} M={m:2d} {method:22s} {us:9.1f} us {row['GBps']:7.0f} GB/s",
                      flush=True)
        del weights, w_ref
        torch.cuda.empty_cache()

    steps = {}
    for m in ms:
        for method in methods:
            rows = {r["shape"]: r for r in results if r["M"] == m and r["method"] == method}
            if all(s in rows for s in STEP):
                us = args.layers * sum(rows[s]["us"] for s in STEP)
                read = args.layers * sum(rows[s]["bytes"] for s in STEP)
                steps[f"M={m} {method}"] = dict(ms=round(us / 1e3, 3), roofline_ms=round(read / HBM_GBPS / 1e6, 3))
                print(f"per decode step, {args.layers} layers, M={m:2d} {method:8s}: {us / 1e3:7.2f} ms "
                      f"(weights {read / 1e9:.1f} GB: {read / HBM_GBPS / 1e6:.2f} ms at {HBM_GBPS:.0f} GB/s)")
    print(f"total {time.time() - t0:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=props.name, sms=props.multi_processor_count, group=args.group, reps=args.reps,
                           layers=args.layers, results=results, per_step=steps), f, indent=1)


if __name__ == "__main__":
    main()
