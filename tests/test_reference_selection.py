"""Every backend's selection equals a literal reference-order implementation (tests/reference_selection.py).

Keys are post-RoPE keys built around per-head centres, scored with the four real reference stats (skipped when
../shared is absent) and with generated stats. The paths checked: the core policy (CompressionState.plan: the
torch engine, MLX and llama.cpp select through it) with the numpy, torch and MLX scorers, and the GPU plan
(backends/torch/plan.py: the static-cache runner) with the torch scorer and the Triton kernel (in its interpreter on
a CPU). Kept sets must be identical; a difference is allowed only between slots whose ranking scores tie (within
float32 scoring error) at the budget's boundary.
"""

from __future__ import annotations

import dataclasses
import json
import zlib

import numpy as np
import pytest

from reference_selection import literal_raw_scores, literal_select
from triattn_local.compression import CompressionState
from triattn_local.policy import BudgetPolicy
from triattn_local.rope import ModelShape, from_complex_pairs
from triattn_local.scorer import TriAttentionScorer
from triattn_local.stats.format import QueryStats, meta_for_model

torch = pytest.importorskip("torch")
from triattn_local.backends.torch.cache import score_keys_torch  # noqa: E402
from triattn_local.backends.torch.plan import plan_keep_rows  # noqa: E402

MODES = ("per_head", "per_layer_head", "global")
TIE = 1e-4  # z-score units: float32 scoring differs from the float64 literal far below this


def sub_stats(stats: QueryStats, layers: list[int]) -> QueryStats:
    """The same model's stats restricted to a few layers (what a 4-layer test cache needs)."""
    meta = dataclasses.replace(stats.meta, num_layers=len(layers))
    return QueryStats(meta, stats.q_mean_real[layers], stats.q_mean_imag[layers], stats.q_abs_mean[layers],
                      stats.inv_freq, stats.freq_scale)


def generated_stats(seed: int, layers=3, heads=8, kv_heads=2, head_dim=32) -> QueryStats:
    cfg = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=heads * head_dim,
               head_dim=head_dim, rope_theta=1e6, max_position_embeddings=40960)
    shape = ModelShape.from_hf_config(cfg)
    rng = np.random.default_rng(seed)
    f = head_dim // 2
    # concentrated queries, with per-head scales that differ by 10x (where the normalisation order matters)
    scale = np.exp(rng.uniform(-1.2, 1.2, size=(layers, heads, 1)))
    centre = scale * (rng.normal(size=(layers, heads, f)) + 1j * rng.normal(size=(layers, heads, f)))
    inv, s = shape.rope_frequencies()
    return QueryStats(meta_for_model(shape, "generated"), centre.real.astype(np.float32),
                      centre.imag.astype(np.float32), (np.abs(centre) * 1.2).astype(np.float32), inv, s)


def make_keys(stats: QueryStats, positions: np.ndarray, rng) -> np.ndarray:
    """Post-RoPE keys [layers, kv_heads, T, D]: pre-RoPE keys around a per-(layer, KV head) centre drawn from its
    queries' mean, rotated at each slot's own position; a few keys far larger, as sinks tend to be."""
    layers, kv_heads, t = positions.shape
    group = stats.meta.num_heads // kv_heads
    q = stats.q_mean.reshape(layers, kv_heads, group, -1).mean(axis=2)  # [L, Hkv, F]
    f = q.shape[-1]
    gain = np.exp(rng.uniform(-1, 1, size=(layers, kv_heads, 1, 1)))
    noise = rng.normal(size=(layers, kv_heads, t, f)) + 1j * rng.normal(size=(layers, kv_heads, t, f))
    pre = gain * (np.conj(q)[:, :, None, :] / (np.abs(q).mean(axis=-1)[..., None, None] + 1e-9) + 0.8 * noise)
    big = rng.choice(t, size=max(1, t // 200), replace=False)
    pre[:, :, big] *= 4
    post = pre * np.exp(1j * positions[..., None] * stats.inv_freq[None, None, None, :])
    return from_complex_pairs(post, stats.meta.rope_pairing).astype(np.float32)


def compacted_positions(rng, rows: int, t: int, tokens_seen: int, recent: int) -> np.ndarray:
    """Per row, the sorted original positions of a cache that earlier rounds compacted: a contiguous recent tail and
    a scattered older part."""
    out = np.empty((rows, t), dtype=np.int64)
    for r in range(rows):
        older = rng.choice(tokens_seen - recent, size=t - recent, replace=False)
        out[r] = np.sort(np.concatenate([older, np.arange(tokens_seen - recent, tokens_seen)]))
    return out


def positions_for(mode: str, rng, layers: int, kv_heads: int, t: int, tokens_seen: int) -> np.ndarray:
    """[layers, kv_heads, T] slot positions as each mode's bookkeeping holds them."""
    rows = {"per_layer_head": layers * kv_heads, "per_head": kv_heads, "global": 1}[mode]
    pos = compacted_positions(rng, rows, t, tokens_seen, recent=300)
    if mode == "per_layer_head":
        return pos.reshape(layers, kv_heads, t)
    return np.broadcast_to(pos.reshape(1, -1, t), (layers, kv_heads, t)).copy()


def assert_same_keep(got: np.ndarray, want: np.ndarray, ranked: np.ndarray, what: str) -> None:
    """Identical kept slots per row, except slots whose ranking scores tie at the boundary."""
    assert got.shape == want.shape, what
    for r, (g, w) in enumerate(zip(got, want)):
        diff = set(g.tolist()) ^ set(w.tolist())
        if not diff:
            continue
        finite = np.sort(ranked[r][np.isfinite(ranked[r])])[::-1]
        forced = int(np.isinf(ranked[r]).sum())
        boundary = finite[len(w) - forced - 1]
        worst = max(abs(ranked[r][i] - boundary) for i in diff)
        assert worst < TIE, f"{what}: row {r} keeps {len(diff) // 2} other slots (score gap {worst:.3g})"


def core_keep(stats, scorer_scores, positions, policy, tokens_seen, prompt_len):
    """The core policy's choice: CompressionState.plan on given per-query-head scores [layers, heads, T]."""
    layers, kv_heads, t = positions.shape
    state = CompressionState(policy, TriAttentionScorer(stats), layers, kv_heads)
    state.appended(tokens_seen)
    state.positions = positions
    state.prompt_len = prompt_len
    keep, record = state.plan(scorer_scores)
    return {"per_layer_head": keep.reshape(layers * kv_heads, -1), "per_head": keep[0], "global": keep[0, :1]}[
        policy.pruning_mode]


def gpu_plan_keep(stats, scores: torch.Tensor, positions, policy, tokens_seen, prompt_len):
    """The static runner's choice: plan.py on per-query-head scores [layers, heads, T]."""
    layers, kv_heads, t = positions.shape
    rows = {"per_layer_head": positions.reshape(-1, t), "per_head": positions[0], "global": positions[0, :1]}[
        policy.pruning_mode]
    group = stats.meta.num_heads // kv_heads
    keep = plan_keep_rows(policy, scores[None], torch.as_tensor(rows)[None], group, "max", tokens_seen, prompt_len)
    return keep[0].numpy()


def path_scores(stats, keys, tokens_seen, mlx=False, triton=False) -> dict:
    """Per-query-head scores [layers, heads, T] of every backend's scorer: numpy (core), torch, and optionally MLX
    and the Triton kernel."""
    scorer = TriAttentionScorer(stats)
    out = {"numpy": np.stack([scorer.head_scores(i, keys[i], tokens_seen) for i in range(len(keys))])}
    rq = scorer.round_queries(tokens_seen)
    out["torch"] = torch.stack([score_keys_torch(torch.from_numpy(keys[i]), rq.virtual_query[i],
                                                 rq.magnitude_weight[i], scorer.pairing) for i in range(len(keys))])
    if triton:
        from triattn_local.backends.torch import kernels

        out["triton"] = kernels.score_keys(torch.from_numpy(keys), torch.from_numpy(rq.virtual_query),
                                           torch.from_numpy(rq.magnitude_weight), scorer.pairing)
    if mlx:
        mx = pytest.importorskip("mlx.core")
        from triattn_local.backends.mlx.scorer import score_keys_mlx

        out["mlx"] = np.stack([np.array(score_keys_mlx(mx.array(keys[i]), rq.virtual_query[i],
                                                       rq.magnitude_weight[i], scorer.pairing))
                               for i in range(len(keys))])
    return out


def check_all_paths(stats, scores: dict, positions, tokens_seen, policy, prompt_len, raw, what):
    """The literal reference selection against: the core policy on the numpy, torch and MLX scores (the torch
    engine, MLX and llama.cpp), and the GPU plan on the torch and Triton scores (the static-cache runner)."""
    want, ranked = literal_select(raw, positions, tokens_seen, mode=policy.pruning_mode, budget=policy.budget,
                                  window=policy.window, sinks=policy.sinks, prompt_len=prompt_len,
                                  protect_prompt=policy.protects_prompt(prompt_len))
    for name, value in scores.items():
        if isinstance(value, torch.Tensor):
            got = gpu_plan_keep(stats, value, positions, policy, tokens_seen, prompt_len)
            assert_same_keep(got, want, ranked, f"{what} gpu-plan/{name}")
        else:
            got = core_keep(stats, value, positions, policy, tokens_seen, prompt_len)
            assert_same_keep(got, want, ranked, f"{what} core/{name}")
    got = core_keep(stats, scores["torch"].numpy(), positions, policy, tokens_seen, prompt_len)
    assert_same_keep(got, want, ranked, f"{what} core/torch")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("protect", [False, True])
def test_generated_stats_every_path(mode, protect):
    """Generated stats with 10x differences in per-head scale, per-row positions as each mode holds them."""
    rng = np.random.default_rng(7)
    stats = generated_stats(seed=3)
    t, tokens_seen, prompt_len = 600, 5000, 40
    positions = positions_for(mode, rng, stats.meta.num_layers, stats.meta.num_kv_heads, t, tokens_seen)
    keys = make_keys(stats, positions, rng)
    raw = literal_raw_scores(stats, keys, tokens_seen)
    scores = path_scores(stats, keys, tokens_seen, mlx=True, triton=True)
    for budget in (128, 300):
        policy = BudgetPolicy(budget=budget, divide_length=64, window=64, sinks=0, protect_prefill=protect,
                              pruning_mode=mode)
        check_all_paths(stats, scores, positions, tokens_seen, policy, prompt_len, raw, f"{mode} B={budget}")


def test_sinks_are_an_extension_kept_on_top():
    """With sinks the first S positions are kept as well; the rest of the choice is still the reference's."""
    rng = np.random.default_rng(11)
    stats = generated_stats(seed=4)
    positions = positions_for("per_head", rng, 3, 2, 400, 3000)
    positions[..., :4] = np.arange(4)  # the first tokens are still cached (they replace the 4 smallest)
    keys = make_keys(stats, positions, rng)
    raw = literal_raw_scores(stats, keys, 3000)
    policy = BudgetPolicy(budget=128, divide_length=64, window=32, sinks=4, pruning_mode="per_head")
    check_all_paths(stats, path_scores(stats, keys, 3000), positions, 3000, policy, 0, raw, "sinks")
    keep = core_keep(stats, raw.astype(np.float32), positions, policy, 3000, 0)
    assert all(set(range(4)) <= set(positions[0, g, row].tolist()) for g, row in enumerate(keep))


REFERENCE = ("qwen3_8b.pt", "ds_qwen7b.pt", "ds_llama8b.pt", "gpt_oss_120b_stats.pt")


def load_reference(directory, name: str, tmp_path) -> QueryStats:
    from test_reference_stats import CONFIGS
    from triattn_local.stats.reference import import_reference

    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[name]))
    return import_reference(directory / name, tmp_path)


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_stats_every_mode_and_budget(reference_stats_dir, tmp_path, name):
    """3000 keys per (layer, KV head), 4 layers of each real model's stats, budgets 512 / 1024 / 2048."""
    full = load_reference(reference_stats_dir, name, tmp_path)
    n = full.meta.num_layers
    stats = sub_stats(full, [0, n // 3, 2 * n // 3, n - 1])
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    t, tokens_seen = 3000, 12000
    shared = positions_for("global", rng, 4, stats.meta.num_kv_heads, t, tokens_seen)
    keys = make_keys(stats, shared, rng)
    raw = literal_raw_scores(stats, keys, tokens_seen)  # post-RoPE keys: the scores do not depend on positions
    scores = path_scores(stats, keys, tokens_seen, mlx=True)
    for mode in MODES:
        for budget in (512, 1024, 2048):
            policy = BudgetPolicy(budget=budget, divide_length=128, window=128, sinks=0, pruning_mode=mode)
            check_all_paths(stats, scores, shared, tokens_seen, policy, 0, raw, f"{name} {mode} B={budget}")
    policy = BudgetPolicy(budget=1024, divide_length=128, window=128, protect_prefill=True, pruning_mode="per_head")
    check_all_paths(stats, scores, shared, tokens_seen, policy, 500, raw, f"{name} protect_prefill")


def test_shared_vectors_are_the_literal_selection():
    """tests/vectors (which every backend's scorer test reads) hold the reference-order selection."""
    from vectors_io import load_vectors, mode_positions, policy_for

    stats, v, meta = load_vectors()
    raw = literal_raw_scores(stats, v["keys"], meta["round_start"])
    for mode in MODES:
        policy = policy_for(meta, mode)
        want, ranked = literal_select(raw, mode_positions(v, mode), meta["round_start"], mode=mode,
                                      budget=policy.budget, window=policy.window, sinks=policy.sinks,
                                      prompt_len=meta["prompt_len"], protect_prompt=True)
        assert_same_keep(v[f"keep_{mode}"], want, ranked, f"vectors {mode}")
