"""An AWQ int4 checkpoint (what `triattn pull qwen3-32b-int4` gets on torch) through the torch engine, on a tiny one
written here: the tiny Qwen3 with its projections quantized (tests/test_int4.py), against the same model with those
weights dequantized back and run by transformers. Full attention (a static cache that grows), TriAttention (bounded
at B + N), batches, calibration, the methods it cannot run, and the CLI end to end."""

import itertools
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_cli import assert_one_line_error, triattn  # noqa: E402
from test_int4 import write_awq_checkpoint  # noqa: E402
from test_static_runner import run  # noqa: E402
from test_torch_backend import synthetic_stats  # noqa: E402
from triattn_local.backends.torch.calibrate import calibrate  # noqa: E402
from triattn_local.backends.torch.engine import TorchEngine  # noqa: E402
from triattn_local.backends.torch.int4 import AWQLinear  # noqa: E402
from triattn_local.backends.torch.static_runner import StaticRunner  # noqa: E402
from triattn_local.batch import generate_batch  # noqa: E402
from triattn_local.engine import CompressionSettings, TokenEvent  # noqa: E402
from triattn_local.errors import UserError  # noqa: E402
from triattn_local.policy import BudgetPolicy  # noqa: E402
from triattn_local.sampling import SamplingParams  # noqa: E402

DEVICE = os.environ.get("TRIATTN_TEST_DEVICE", "cpu")
GROUP = 32  # divides every in_features of the tiny model (128, 256)
PROMPT = [int(x) for x in np.random.default_rng(0).integers(5, 300, size=50)]


@pytest.fixture(scope="module")
def dirs(tiny_model_factory, tmp_path_factory):
    """(AWQ dir, the dequantized model saved as a normal checkpoint)."""
    root = tmp_path_factory.mktemp("awq")
    src = tiny_model_factory("qwen3")
    reference = write_awq_checkpoint(src, root / "awq", GROUP)  # tokenizer copied too
    shutil.copytree(src, root / "dequantized")
    reference.save_pretrained(str(root / "dequantized"))
    return root / "awq", root / "dequantized"


@pytest.fixture(scope="module")
def engines(dirs):
    """(the AWQ engine, the dequantized model on transformers' DynamicCache path)."""
    awq, dequantized = dirs
    return (TorchEngine(str(awq), device=DEVICE, dtype="float32"),
            TorchEngine(str(dequantized), device=DEVICE, dtype="float32", static_cache=False))


def full_attention(engine, prompt, n):
    session = engine.session(CompressionSettings(policy=None))
    tokens = [ev.token_id for ev in session.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0))
              if isinstance(ev, TokenEvent)]
    return tokens, session


def test_loads_as_a_static_model_with_int4_projections(engines):
    awq, _ = engines
    assert awq.awq and awq.model is None
    attn = awq.static_model().model.layers[0].self_attn
    assert any(isinstance(m, AWQLinear) for m in attn.modules())
    assert awq.kv_bytes_per_token == 2 * 3 * 2 * 64 * 4


def test_full_attention_grows_its_cache_and_equals_the_dequantized_model(engines, monkeypatch):
    awq, dequantized = engines
    monkeypatch.setattr(StaticRunner, "initial_capacity", 32)  # 50 prompt tokens → 64 slots, then 128 while decoding
    capacities = []
    forward = StaticRunner.forward

    def watched(self, ids, start):
        out = forward(self, ids, start)
        capacities.append((self.length, self.capacity, self.model.capacity))
        return out

    monkeypatch.setattr(StaticRunner, "forward", watched)
    tokens, session = full_attention(awq, PROMPT, 40)
    want, _ = full_attention(dequantized, PROMPT, 40)
    assert isinstance(session.runner.runner, StaticRunner) and session.runner.runner.grows
    assert tokens == want
    assert capacities[0] == (50, 64, 64) and capacities[-1] == (89, 128, 128)
    assert all(length <= cap == model_cap for length, cap, model_cap in capacities)


def test_sessions_of_one_engine_keep_their_own_caches(engines):
    """The server interleaves conversations on one engine: each runner has its own buffers over the same weights."""
    awq, _ = engines
    params = SamplingParams(max_tokens=20, temperature=0.0)
    prompts = (PROMPT, PROMPT[::-1][:30])
    alone = [[ev.token_id for ev in awq.session().generate(p, params) if isinstance(ev, TokenEvent)]
             for p in prompts]
    together = ([], [])
    for events in itertools.zip_longest(*(awq.session().generate(p, params) for p in prompts)):
        for tokens, ev in zip(together, events):  # one event of each in turn
            if isinstance(ev, TokenEvent):
                tokens.append(ev.token_id)
    assert list(together) == alone


def test_a_capacity_given_up_front_never_grows(engines):
    runner = StaticRunner(engines[0].static_model(), 48)
    runner.forward([PROMPT[:40]], 0)
    with pytest.raises(RuntimeError, match="static KV cache full"):
        runner.forward([PROMPT[40:]], 40)
    assert runner.capacity == runner.model.capacity == 48


@pytest.mark.parametrize("mode", ["per_head", "global"])
def test_triattention_keeps_what_the_dequantized_model_keeps(engines, mode):
    awq, dequantized = engines
    prompt = [int(x) for x in np.random.default_rng(1).integers(5, 300, size=120)]
    policy = BudgetPolicy(40, 16, 8, 2, pruning_mode=mode)
    tokens, kept, lengths, session = run(awq, prompt, policy, 50)
    want_tokens, want_kept, _, _ = run(dequantized, prompt, policy, 50)
    runner = session.runner.runner
    assert isinstance(runner, StaticRunner) and not runner.grows
    assert len(kept) >= 5 and kept == want_kept
    assert tokens == want_tokens
    assert max(lengths) == policy.capacity == runner.model.capacity  # never more than B + N


def test_a_batch_runs_on_a_growing_triattention_cache(engines):
    """generate_batch asks for a runner without a capacity: TriAttention on a cache that grows (up to B + N)."""
    awq, dequantized = engines
    prompts = [[int(x) for x in np.random.default_rng(s).integers(5, 300, size=60)] for s in range(2)]
    policy = BudgetPolicy(40, 16, 8, 2)
    params = SamplingParams(max_tokens=30, temperature=0.0)
    got = generate_batch(awq, prompts, CompressionSettings(policy, synthetic_stats(awq.shape)), params)
    want = generate_batch(dequantized, prompts, CompressionSettings(policy, synthetic_stats(awq.shape)), params)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert all(r.metrics.rounds >= 3 for r in got)


def test_calibration_equals_the_dequantized_model(engines):
    awq, dequantized = engines
    text = "The quick brown fox reasons step by step, then checks each step. " * 8
    model = awq.static_model()
    runner = StaticRunner(model, 64)
    runner.forward([PROMPT], 0)
    buffers = runner.model.k_cache
    got = awq.calibrate(text, progress=False, max_tokens=300)
    chunked = calibrate(model, awq.tokenizer, text, model_id="awq", max_tokens=300, chunk_tokens=299)  # + 1 token
    want = dequantized.calibrate(text, progress=False, max_tokens=300)
    assert runner.model.k_cache is buffers and model.k_cache is None  # its own cache, freed after; the runner's kept
    assert got.meta.calibration_tokens == chunked.meta.calibration_tokens == 300
    for name in ("q_mean_real", "q_mean_imag", "q_abs_mean"):
        scale = np.abs(getattr(want, name)).max()
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-5 * scale)
        np.testing.assert_allclose(getattr(chunked, name), getattr(want, name), rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("method", ["snapkv", "h2o", "rkv", "streaming"])
def test_methods_that_need_transformers_are_a_clear_error(engines, method):
    awq, _ = engines
    settings = CompressionSettings(BudgetPolicy(40, 16, 8, 2), method=method)
    with pytest.raises(UserError, match=f"{method} needs the transformers path.*TriAttention.*--no-compress"):
        awq.session(settings)


@pytest.mark.parametrize("change", [{"bits": 8}, {"version": "gemv"}])
def test_unsupported_awq_variants_are_a_clear_error(dirs, tmp_path, change):
    bad = tmp_path / "bad"
    shutil.copytree(dirs[0], bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"].update(change)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="unsupported quantization") as e:
        TorchEngine(str(bad), device=DEVICE, dtype="float32")
    assert "\n" not in str(e.value)


def test_cli_calibrates_and_runs_an_awq_model_end_to_end(dirs, tmp_path):
    awq, _ = dirs
    stats = tmp_path / "stats.safetensors"
    calibrated = triattn("calibrate", awq, "--output", stats, "--max-tokens", "400", "--device", DEVICE)
    assert calibrated.returncode == 0, calibrated.stderr
    assert "400 tokens, 3 layers x 4 heads" in calibrated.stderr
    compressed = triattn("run", awq, "Count to ten.", "--stats", stats, "--budget", "40", "--divide-length", "8",
                         "--window", "4", "--max-tokens", "40", "--temperature", "0", "--device", DEVICE,
                         tmp_cache=tmp_path)
    assert compressed.returncode == 0, compressed.stderr
    summary = compressed.stderr.strip().splitlines()[-1]
    assert "40 tokens" in summary and "compression rounds" in summary and " 0 compression" not in summary
    full = triattn("run", awq, "Count to ten.", "--no-compress", "--max-tokens", "10", "--temperature", "0",
                   "--device", DEVICE, tmp_cache=tmp_path)
    assert full.returncode == 0, full.stderr
    assert "10 tokens" in full.stderr.strip().splitlines()[-1]
    assert_one_line_error(triattn("run", awq, "hi", "--method", "snapkv", "--device", DEVICE, tmp_cache=tmp_path),
                          "snapkv needs the transformers path", "--no-compress")
