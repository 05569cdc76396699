"""The MLX backend (mlx-lm) against the shared vectors and the torch backend, on MLX's Linux CPU build in CI.

Both backends load the same tiny random-init model directory in float32, so greedy tokens and the positions each
compression round keeps must agree exactly (the scores differ by float rounding only; the selection is the core's).
"""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from triattn_local.backends import choose_backend, load_engine  # noqa: E402
from triattn_local.backends.mlx.cache import TriAttentionKVCache, make_prompt_cache  # noqa: E402
from triattn_local.backends.mlx.engine import MLXEngine  # noqa: E402
from triattn_local.backends.mlx.methods import layer_head_scores  # noqa: E402
from triattn_local.backends.mlx.scorer import score_keys_metal, score_keys_mlx  # noqa: E402
from triattn_local.compression import CompressionState  # noqa: E402
from triattn_local.engine import CompressionEvent, CompressionSettings  # noqa: E402
from triattn_local.errors import UserError  # noqa: E402
from triattn_local.methods import STREAMING_SINKS  # noqa: E402
from triattn_local.policy import BudgetPolicy  # noqa: E402
from triattn_local.rope import from_complex_pairs, to_complex_pairs  # noqa: E402
from triattn_local.scorer import TriAttentionScorer  # noqa: E402
from test_scorer import random_stats  # noqa: E402
from test_torch_backend import generate, synthetic_stats  # noqa: E402
from vectors_io import load_vectors, policy_keep  # noqa: E402

MODES = ["per_layer_head", "per_head", "global"]
PROMPT = [int(x) for x in np.random.default_rng(0).integers(5, 300, size=120)]  # several times the budget
POLICY = dict(budget=32, divide_length=8, window=4, sinks=2)  # budget a multiple of N: mlx-lm's chunks line up


@pytest.fixture(scope="module")
def engines(tiny_model_factory):
    """(mlx, torch) engines of the same tiny Qwen3 directory, both float32."""
    path = str(tiny_model_factory("qwen3"))
    return load_engine(path, backend="mlx", dtype="float32"), load_engine(path, backend="torch", device="cpu")


def kept(records):
    return [r.kept for r in records]


# ---- the scorer ------------------------------------------------------------------------------------------------


def test_mlx_scorer_matches_shared_vectors():
    """Scores of the shared keys, then the core's policy on them: the shared keep indices in every mode."""
    stats, v, meta = load_vectors()
    scorer = TriAttentionScorer(stats)
    rq = scorer.round_queries(meta["round_start"])
    for layer in range(stats.meta.num_layers):
        got = score_keys_mlx(mx.array(v["keys"][layer]), rq.virtual_query[layer], rq.magnitude_weight[layer])
        np.testing.assert_allclose(np.array(got), v["head_scores"][layer], rtol=1e-4, atol=1e-4)
    keys = [mx.array(k[None]) for k in v["keys"]]  # a batch of one: [1, kv_heads, T, D] per layer
    scores = layer_head_scores(keys, scorer, meta["round_start"])[0]
    for mode in MODES:
        np.testing.assert_array_equal(policy_keep(stats, meta, v, scores, mode), v[f"keep_{mode}"])


def test_mlx_scorer_interleaved_pairs_and_batches():
    """Interleaved RoPE pairs and a leading batch dimension give the reference scorer's values."""
    stats = random_stats().with_meta(rope_pairing="interleaved")
    scorer = TriAttentionScorer(stats)
    rng = np.random.default_rng(4)
    keys = from_complex_pairs(to_complex_pairs(rng.normal(size=(3, 2, 9, 32)), "half"), "interleaved")
    rq = scorer.round_queries(321)
    got = np.array(score_keys_mlx(mx.array(keys.astype(np.float32)), rq.virtual_query[1], rq.magnitude_weight[1],
                                  "interleaved"))
    for b in range(3):
        np.testing.assert_allclose(got[b], scorer.head_scores(1, keys[b], 321), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not mx.metal.is_available(), reason="the fused Metal kernel needs Metal (Apple Silicon)")
def test_metal_kernel_matches_mlx_ops():
    stats, v, meta = load_vectors()
    rq = TriAttentionScorer(stats).round_queries(meta["round_start"])
    for layer in range(stats.meta.num_layers):
        keys = mx.array(v["keys"][layer][None])
        for dtype in (mx.float32, mx.float16):
            a = score_keys_metal(keys.astype(dtype), rq.virtual_query[layer], rq.magnitude_weight[layer])
            b = score_keys_mlx(keys.astype(dtype), rq.virtual_query[layer], rq.magnitude_weight[layer])
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-3)


# ---- against the torch backend ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_large_budget_gives_torch_greedy_tokens(arch, tiny_model_factory):
    """Budget above the whole sequence: token for token the torch backend's greedy output, with and without
    compression settings (the prompt still goes through in chunks of N)."""
    # mlx-lm's qwen2 takes head_dim as hidden_size / heads, as in real Qwen2 checkpoints (the tiny default differs)
    path = str(tiny_model_factory(arch, **({"head_dim": 32} if arch == "qwen2" else {})))
    mlx_engine = load_engine(path, backend="mlx", dtype="float32")
    torch_engine = load_engine(path, backend="torch", device="cpu")
    policy = BudgetPolicy(budget=4096, divide_length=16, window=8)
    tokens, rounds, _, _ = generate(mlx_engine, PROMPT[:60], policy, 40)
    want, _, _, _ = generate(torch_engine, PROMPT[:60], policy, 40)
    assert len(tokens) >= 20 and rounds == []
    assert tokens == want[:len(tokens)]
    assert generate(mlx_engine, PROMPT[:60], None, 40)[0] == tokens  # --no-compress


@pytest.mark.parametrize("mode", MODES)
def test_rounds_keep_the_torch_backends_positions(mode, engines):
    """Compression on: every round keeps the same positions as the torch backend's, and greedy tokens agree."""
    mlx_engine, torch_engine = engines
    policy = BudgetPolicy(pruning_mode=mode, **POLICY)
    tokens, rounds, done, _ = generate(mlx_engine, PROMPT, policy, 24)
    want_tokens, want_rounds, _, _ = generate(torch_engine, PROMPT, policy, 24)
    assert len(rounds) == done.metrics.rounds >= 10
    assert kept(rounds) == kept(want_rounds)
    assert tokens == want_tokens


@pytest.mark.parametrize("mode", MODES)
def test_same_keys_same_kept_positions(mode, engines):
    """The torch backend's cached keys scored by the MLX scorer: the core plans the same keep indices as from the
    torch scorer's scores."""
    mlx_engine, torch_engine = engines
    shape = torch_engine.shape
    stats = synthetic_stats(shape)
    session = torch_engine.session(CompressionSettings(None))
    session.runner.forward(PROMPT[:90], 0)
    keys = [layer.keys.numpy() for layer in session.runner.cache.layers]  # [1, kv_heads, 90, D] per layer
    scorer = TriAttentionScorer(stats)
    plans = []
    for scores in (session.runner.runner.head_scores(scorer, 89)[0],
                   layer_head_scores([mx.array(k) for k in keys], scorer, 89)[0]):
        state = CompressionState(BudgetPolicy(pruning_mode=mode, **POLICY), scorer, shape.num_layers,
                                 shape.num_kv_heads)
        state.appended(90)
        plans.append(state.plan(scores))
    np.testing.assert_array_equal(plans[0][0], plans[1][0])
    assert plans[0][1].kept == plans[1][1].kept


def test_batched_generation_equals_one_at_a_time(engines):
    """generate_batch on the MLX runner (rows in lockstep, each compacted with its own keep indices): every row's
    tokens and rounds are those of the same prompt run alone."""
    from triattn_local.batch import generate_batch
    from triattn_local.sampling import SamplingParams

    mlx_engine, _ = engines
    policy = BudgetPolicy(pruning_mode="per_layer_head", **POLICY)
    settings = CompressionSettings(policy, synthetic_stats(mlx_engine.shape))
    prompts = [PROMPT[i:i + 60] for i in (0, 20, 40)]
    rounds = {i: [] for i in range(3)}
    results = generate_batch(mlx_engine, prompts, settings, SamplingParams(max_tokens=20, temperature=0),
                             on_round=lambda row, record: rounds[row].append(record))
    for i, prompt in enumerate(prompts):
        tokens, alone, _, _ = generate(mlx_engine, prompt, policy, 20)
        assert results[i].token_ids == tokens
        assert kept(rounds[i]) == kept(alone) and len(alone) >= 4


# ---- the budget ------------------------------------------------------------------------------------------------


def watch_cache_lengths(caches) -> list[int]:
    """Record the stored slots of every cache after each of its update_and_fetch calls (the attention's view)."""
    seen = []
    for cache in caches:
        update = cache.update_and_fetch

        def watched(keys, values, update=update, cache=cache):
            out = update(keys, values)
            seen.append(cache.length)
            return out

        cache.update_and_fetch = watched
    return seen


@pytest.mark.parametrize("mode", MODES)
def test_retained_kv_never_exceeds_budget_plus_divide_length(mode, engines):
    mlx_engine, _ = engines
    budget, divide = POLICY["budget"], POLICY["divide_length"]
    session = mlx_engine.session(CompressionSettings(BudgetPolicy(pruning_mode=mode, **POLICY),
                                                     synthetic_stats(mlx_engine.shape)))
    seen = watch_cache_lengths(session.runner.caches)
    from triattn_local.sampling import SamplingParams

    events = list(session.generate(PROMPT, SamplingParams(max_tokens=40, temperature=0.8, seed=1)))
    done = events[-1]
    assert max(seen) == budget + divide
    assert done.metrics.peak_retained_tokens == budget + divide
    assert {c.length for c in session.runner.caches} == {done.metrics.retained_tokens}
    assert done.metrics.rounds == (done.metrics.logical_tokens - budget - divide) // divide + 1
    assert sum(c.nbytes for c in session.runner.caches) == done.metrics.kv_bytes < done.metrics.kv_bytes_full


def test_compressed_cache_equals_attention_restricted_to_kept_positions(engines):
    """Original positions, compacted buffer: the MLX logits equal a full-cache transformers run whose mask shows each
    token exactly what the compressed cache held (so offset, RoPE and the mask are right after compaction)."""
    import torch
    from transformers import AutoModelForCausalLM

    mlx_engine, _ = engines
    n = 70
    session = mlx_engine.session(CompressionSettings(BudgetPolicy(24, 8, 4, 1, pruning_mode="global"),
                                                     synthetic_stats(mlx_engine.shape)))
    visible = np.zeros((n, n), dtype=bool)
    cached = np.zeros(0, dtype=np.int64)
    forward = session.runner.forward
    last = {}

    def watched_forward(ids, start):
        nonlocal cached
        for i in range(len(ids)):
            visible[start + i, cached] = True
            visible[start + i, start:start + i + 1] = True
        cached = np.concatenate([cached, np.arange(start, start + len(ids))])
        last["logits"] = forward(ids, start)
        return last["logits"]

    session.runner.forward = watched_forward
    for item in session._feed(PROMPT[:n]):
        if isinstance(item, CompressionEvent):
            cached = np.array(item.record.kept[0][2])
    model = AutoModelForCausalLM.from_pretrained(str(mlx_engine.model_path))
    mask = torch.where(torch.tensor(visible), 0.0, float("-inf"))[None, None]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([PROMPT[:n]]), attention_mask=mask).logits[0, -1].numpy()
    assert session.state.rounds >= 5
    np.testing.assert_allclose(last["logits"], ref, rtol=1e-4, atol=1e-4)


# ---- mlx-lm's own generation with the self-compressing cache ---------------------------------------------------


def stream(engine, cache, n, **kwargs):
    import mlx_lm

    return [r.token for r in mlx_lm.stream_generate(engine.model, engine.tokenizer, PROMPT, max_tokens=n,
                                                    prompt_cache=cache, prefill_step_size=POLICY["divide_length"],
                                                    **kwargs)]


@pytest.mark.parametrize("mode", MODES)
def test_mlx_lm_stream_generate_compresses_inside_update_and_fetch(mode, engines):
    """mlx-lm's pipelined generate_step with a self-compressing cache: the same tokens and rounds as the Session
    path, and never more than B + N slots."""
    mlx_engine, _ = engines
    policy = BudgetPolicy(pruning_mode=mode, **POLICY)
    settings = CompressionSettings(policy, synthetic_stats(mlx_engine.shape))
    tokens, rounds, _, _ = generate(mlx_engine, PROMPT, policy, 24)
    cache = mlx_engine.make_prompt_cache(settings, prompt_len=len(PROMPT))
    seen = watch_cache_lengths(cache)
    assert stream(mlx_engine, cache, 24) == tokens
    compressor = cache[0].compressor
    assert max(seen) == policy.capacity and compressor.state.peak_retained == policy.capacity
    assert kept(compressor.records[:len(rounds)]) == kept(rounds)  # mlx-lm runs one step ahead: maybe one more
    assert all(c.offset == compressor.state.next_position for c in cache)


def test_mask_trim_state_of_the_compressing_cache(engines):
    mlx_engine, _ = engines
    policy = BudgetPolicy(pruning_mode="per_layer_head", **POLICY)
    cache = mlx_engine.make_prompt_cache(CompressionSettings(policy, synthetic_stats(mlx_engine.shape)))
    stream(mlx_engine, cache, 5)
    state = cache[0].compressor.state
    # masks: built from the stored slots (after a due round), not from the absolute offset
    assert cache[0].make_mask(1) is None and cache[0].make_mask(4) == "causal"
    stored = state.retained
    n = policy.capacity - stored + 1  # enough new tokens to make a round due (if there is something to drop)
    after_round = policy.budget if stored > policy.budget else stored
    assert cache[0].make_mask(n, return_array=True).shape == (n, after_round + n)
    with pytest.raises(ValueError, match="sliding-window"):
        cache[0].make_mask(4, window_size=16)
    # trim: the newest tokens go, in every layer and in the tracked positions
    offset, length = cache[0].offset, cache[0].length
    assert [c.trim(2) for c in cache] == [2] * len(cache)
    assert all(c.offset == offset - 2 and c.length == length - 2 for c in cache)
    assert state.next_position == offset - 2 and state.retained == length - 2
    # trimming more stops where a round dropped a token: only the contiguous newest positions go
    before, nxt = state.positions.copy(), state.next_position
    m = [c.trim(10_000) for c in cache][0]
    assert 0 < m < before.shape[-1]
    assert (before[..., before.shape[-1] - m:] == np.arange(nxt - m, nxt)).all()
    assert not (before[..., before.shape[-1] - m - 1] == nxt - m - 1).all()
    assert state.retained == before.shape[-1] - m and all(c.length == state.retained for c in cache)
    # state / meta_state round trip, nbytes of the retained tokens
    c = cache[1]
    copy = TriAttentionKVCache.from_state(c.state, c.meta_state)
    assert copy.offset == c.offset and copy.length == c.length and copy.nbytes == c.nbytes > 0
    assert np.array_equal(np.array(copy.state[0]), np.array(c.state[0]))
    assert c.nbytes == c.length * 2 * mlx_engine.shape.num_kv_heads * mlx_engine.shape.head_dim * 4


# ---- quantized KV ----------------------------------------------------------------------------------------------


def test_quantized_kv_composes_with_compression(engines):
    """K/V stored 8-bit in mlx-lm's QuantizedKVCache layout: without a round, exactly mlx-lm's QuantizedKVCache
    tokens; with rounds, compacted like the float cache: the budget holds and KV bytes shrink 3.6x."""
    import mlx_lm
    from mlx_lm.models.cache import QuantizedKVCache

    mlx_engine, _ = engines
    quantized = MLXEngine(str(mlx_engine.model_path), dtype="float32", kv_bits=8)
    tokens, rounds, _, _ = generate(quantized, PROMPT, BudgetPolicy(budget=4096, divide_length=16, window=8), 24)
    reference = [QuantizedKVCache(group_size=64, bits=8) for _ in range(quantized.shape.num_layers)]
    want = [r.token for r in mlx_lm.stream_generate(quantized.model, quantized.tokenizer, PROMPT, max_tokens=24,
                                                    prompt_cache=reference, prefill_step_size=16)]
    assert rounds == [] and tokens == want[:len(tokens)] and len(tokens) >= 10

    policy = BudgetPolicy(pruning_mode="per_head", **POLICY)
    _, _, done, _ = generate(mlx_engine, PROMPT, policy, 24)
    _, q_rounds, q_done, q_session = generate(quantized, PROMPT, policy, 24)
    assert all(c.quantized and isinstance(c.keys, tuple) for c in q_session.runner.caches)
    assert len(q_rounds) >= 10 and q_done.metrics.peak_retained_tokens == policy.capacity
    assert sum(c.nbytes for c in q_session.runner.caches) == q_done.metrics.kv_bytes
    assert q_done.metrics.kv_bytes / q_done.metrics.retained_tokens * 3.5 < \
        done.metrics.kv_bytes / done.metrics.retained_tokens  # 144 vs 512 bytes per token and layer here
    # mlx-lm's kv_bits path converts the caches in place mid-generation; compression goes on
    cache = mlx_engine.make_prompt_cache(CompressionSettings(policy, synthetic_stats(mlx_engine.shape)))
    seen = watch_cache_lengths(cache)
    stream(mlx_engine, cache, 24, kv_bits=8, kv_group_size=64, quantized_kv_start=60)
    assert all(c.quantized for c in cache) and max(seen) == policy.capacity
    assert len(cache[0].compressor.records) >= 10


def test_mlx_community_quantized_model(tiny_model_factory, tmp_path):
    """A 4-bit model in mlx-community's format (mlx_lm.convert): loads, generates within the budget, calibrates."""
    import json
    import shutil

    from mlx_lm import convert

    source = tmp_path / "hf"
    shutil.copytree(tiny_model_factory("qwen3"), source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(dict(config, rms_norm_eps=1e-6)))  # mlx_lm.convert needs it
    convert(str(source), mlx_path=str(tmp_path / "q4"), quantize=True, q_bits=4, q_group_size=64)
    engine = load_engine(str(tmp_path / "q4"), backend="mlx")
    assert type(engine.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    policy = BudgetPolicy(pruning_mode="per_head", **POLICY)
    tokens, rounds, done, _ = generate(engine, PROMPT, policy, 16)
    assert len(tokens) == 16 and len(rounds) >= 10 and done.metrics.peak_retained_tokens == policy.capacity
    stats = engine.calibrate("Some calibration text, long enough. " * 8, progress=False)
    stats.check_matches(engine.shape, where="calibrated")


def test_generation_continues_in_another_thread(tiny_model_factory):
    """A server or chat loads in one thread and generates in others: MLX evaluates a lazy array only in the thread
    that made it, so the engine and runner leave nothing lazy behind (float16 makes set_dtype create new arrays)."""
    import threading

    from triattn_local.sampling import SamplingParams

    engine = load_engine(str(tiny_model_factory("qwen3")), backend="mlx", dtype="float16")
    session = engine.session(CompressionSettings(BudgetPolicy(**POLICY), synthetic_stats(engine.shape)))
    results = []

    def turn(ids):
        try:
            results.append(list(session.generate(ids, SamplingParams(max_tokens=12, temperature=0))))
        except Exception as e:  # noqa: BLE001 - reported below
            results.append(e)

    for ids in (PROMPT[:50], PROMPT[50:70]):  # the second turn continues the first's compacted cache
        thread = threading.Thread(target=turn, args=(ids,))
        thread.start()
        thread.join()
    assert all(isinstance(r, list) for r in results), results
    assert results[-1][-1].metrics.rounds >= 3


# ---- calibration, methods, CLI -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen3", "llama"])  # after q_norm (Qwen3), and straight from q_proj
def test_calibration_matches_torch(arch, tiny_model_factory):
    from triattn_local.calibration_text import default_calibration_text

    path = str(tiny_model_factory(arch))
    text = default_calibration_text()[:2000]
    got = load_engine(path, backend="mlx").calibrate(text, progress=False, max_tokens=300)
    want = load_engine(path, backend="torch", device="cpu").calibrate(text, progress=False, max_tokens=300)
    assert got.meta == want.meta
    for name in ("q_mean_real", "q_mean_imag", "q_abs_mean", "inv_freq", "freq_scale"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-5)


def test_streaming_baseline_and_unsupported_methods(engines):
    mlx_engine, torch_engine = engines
    policy = BudgetPolicy(pruning_mode="per_head", **POLICY)
    settings = CompressionSettings(policy, method="streaming")
    rounds = [e.record for e in mlx_engine.session(settings)._feed(PROMPT) if isinstance(e, CompressionEvent)]
    want = [e.record for e in torch_engine.session(settings)._feed(PROMPT) if isinstance(e, CompressionEvent)]
    assert rounds and kept(rounds) == kept(want)
    sinks = max(POLICY["sinks"], STREAMING_SINKS)  # StreamingLLM's own sinks
    assert rounds[-1].kept[0][2] == list(range(sinks)) + list(range(120 - (POLICY["budget"] - sinks), 120))
    for method in ("snapkv", "rkv", "h2o"):
        with pytest.raises(UserError, match="not available with the mlx backend"):
            mlx_engine.session(CompressionSettings(policy, method=method))
        with pytest.raises(UserError, match="not available with the mlx backend"):
            make_prompt_cache(mlx_engine.shape, CompressionSettings(policy, method=method))


def test_backend_choice_and_errors(tmp_path):
    assert choose_backend("mlx") == ("mlx", "asked for with --backend")
    with pytest.raises(UserError, match="no such model directory"):
        load_engine(str(tmp_path / "missing"), backend="mlx")
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "num_attention_heads": 2, '
                                          '"num_hidden_layers": 1, "hidden_size": 8}')
    with pytest.raises(UserError, match="not supported by the mlx backend"):
        load_engine(str(tmp_path), backend="mlx")


def test_cli_run_with_backend_mlx(tiny_model_factory, tmp_path):
    """`triattn run --backend mlx`, as a user runs it: streamed text, the summary line, compression rounds."""
    import json

    from test_cli import triattn

    path = tiny_model_factory("qwen3")
    stats = tmp_path / "stats.safetensors"
    synthetic_stats(load_engine(str(path), backend="mlx").shape).save(stats)
    trace = tmp_path / "trace.jsonl"
    r = triattn("run", path, "Count to ten.", "--backend", "mlx", "--stats", stats, "--budget", "40",
                "--divide-length", "8", "--window", "4", "--max-tokens", "60", "--temperature", "0",
                "--kv-trace", trace)
    assert r.returncode == 0, r.stderr
    summary = r.stderr.strip().splitlines()[-1]
    assert "tok/s" in summary and "peak KV 48 tokens" in summary
    assert len({json.loads(x)["round"] for x in trace.read_text().splitlines()}) >= 2


def test_sampling_stays_in_mlx_and_matches_the_host(engines, monkeypatch):
    """Generation samples the MLX logits where MLX keeps them (no [vocab] copy per step): greedy gives the host
    sampler's tokens, and a seeded sampled run repeats."""
    import triattn_local.sampling as sampling

    calls = []
    original = sampling.sample_on_mlx
    monkeypatch.setattr(sampling, "sample_on_mlx", lambda *a, **k: calls.append(1) or original(*a, **k))
    mlx_engine, torch_engine = engines
    policy = BudgetPolicy(**POLICY)
    tokens, rounds, _, _ = generate(mlx_engine, PROMPT[:60], policy, 40)
    assert len(calls) == len(tokens) and rounds
    assert tokens == generate(torch_engine, PROMPT[:60], policy, 40)[0]
    sampled = generate(mlx_engine, PROMPT[:60], policy, 30, temperature=1.0, seed=5)[0]
    assert sampled == generate(mlx_engine, PROMPT[:60], policy, 30, temperature=1.0, seed=5)[0]
