"""`triattn bench` and `triattn doctor` on the CUDA path, as seen from a machine without a GPU."""

import pytest

from test_cli import assert_one_line_error, triattn
from triattn_local.doctor import cuda_kernel_note


def test_bench_has_help():
    r = triattn("bench", "--help")
    assert r.returncode == 0 and "--budget" in r.stdout and "--memory-gib" in r.stdout


@pytest.mark.parametrize("args, words", [
    (["--shape", "qwen9-1t"], ["unknown shape", "qwen3-8b"]),
    (["--context", "4k"], ["comma-separated integers"]),
    (["--batch", "0"], ["--batch", "between 1"]),
])
def test_bench_rejects_bad_input_before_looking_for_a_gpu(args, words):
    assert_one_line_error(triattn("bench", *args), *words)


def test_bench_without_a_gpu_says_so():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    assert_one_line_error(triattn("bench"), "CUDA")


def test_doctor_names_the_architecture_and_what_is_tested():
    assert "Hopper" in cuda_kernel_note(9, 0) and "tested" in cuda_kernel_note(9, 0)
    assert "untested" in cuda_kernel_note(8, 9) and "RTX 40" in cuda_kernel_note(8, 9)
    assert "GB10" in cuda_kernel_note(12, 1) and "untested" in cuda_kernel_note(12, 1)
    assert "fallbacks" in cuda_kernel_note(7, 5)


def test_bench_rows_run_end_to_end_on_a_tiny_shape_without_a_gpu(monkeypatch):
    """bench_static's wiring (runner, cache fill, rounds, row figures) on the CPU: CUDA calls stubbed, no graph."""
    import numpy as np
    import torch

    from triattn_local.backends.torch import bench, static_model
    from triattn_local.rope import ModelShape
    from triattn_local.stats.format import QueryStats, meta_for_model

    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 0)
    monkeypatch.setattr(static_model.GraphedDecodeStep, "_capture", lambda self: None)
    tiny = dict(bench.SHAPES["qwen3-8b"], hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=500)
    monkeypatch.setitem(bench.SHAPES, "tiny", tiny)
    shape = ModelShape.from_hf_config(tiny)
    rng = np.random.default_rng(0)
    real, imag = rng.normal(size=(2, 4, 16)), rng.normal(size=(2, 4, 16))
    stats = QueryStats(meta_for_model(shape, "tiny"), real.astype(np.float32), imag.astype(np.float32),
                       (np.hypot(real, imag) + 0.5).astype(np.float32), *shape.rope_frequencies())
    model = bench.random_static_model("tiny", "cpu", dtype=torch.float32)
    tri = bench.bench_static(model, stats, 2, 600, 256, 16, 40, bandwidth=1e12)
    full = bench.bench_static(model, stats, 2, 600, None, 16, 40, bandwidth=1e12)
    per_slot = 2 * 2 * 2 * 32 * 4  # K and V · layers · KV heads · head_dim · float32 bytes, per row
    assert 0 < tri.compress_share < 1 and full.compress_share == 0  # rounds ran every 16 steps
    assert tri.kv_gib * 2**30 <= 2 * (256 + 16) * per_slot  # bounded by B + N slots per row
    assert full.kv_gib * 2**30 == 2 * (600 + 40) * per_slot  # context + every decoded token
    assert tri.roofline_ms < full.roofline_ms and tri.step_ms > 0 and tri.first_token_s > 0
    assert model.k_cache is None  # the runners' caches are gone once their rows are measured
    line = bench.describe(tri)  # what the command prints per row
    assert all(w in line for w in ("ms/step", "tok/s/stream", "tok/s total", "peak", "KV", "roofline", "compress"))


def test_bench_takes_a_models_shape_from_its_config(tiny_model_factory, tmp_path):
    from triattn_local.backends.torch import bench

    path = tiny_model_factory("llama")
    name = bench.add_model_shape("my-model", path)
    assert bench.SHAPES[name]["hidden_size"] == 128 and bench.SHAPES[name]["architectures"] == ["LlamaForCausalLM"]
    del bench.SHAPES[name]
    assert_one_line_error(triattn("bench", str(tmp_path / "nothing-here")), "nothing-here")
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    assert_one_line_error(triattn("bench", str(tmp_path)), "not supported")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():  # a good model gets as far as looking for the GPU
        assert_one_line_error(triattn("bench", str(path)), "CUDA")
