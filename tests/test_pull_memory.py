"""The memory estimate `triattn pull` prints: weights, KV at the budget, full KV at the context, and the verdict."""

from rich.console import Console

from triattn_local.memory import estimate, kv_bytes_per_token, render, system_memory

# Qwen3-8B's published config (the fields the estimate reads).
QWEN3_8B = dict(architectures=["Qwen3ForCausalLM"], num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, hidden_size=4096, max_position_embeddings=40960,
                torch_dtype="bfloat16")
GiB = 2**30


def text(renderable) -> str:
    console = Console(width=120, record=True)
    console.print(renderable)
    return console.export_text()


def test_kv_bytes_per_token_of_qwen3_8b():
    assert kv_bytes_per_token(QWEN3_8B, 2) == 36 * 8 * 128 * 2 * 2 == 147456  # 144 KiB per token in bf16


def test_gpu_estimate_budget_fits_where_full_context_does_not():
    weights = 16 * GiB
    device = ("GPU 0 (test)", 24 * GiB, 20 * GiB, True)
    est = estimate(QWEN3_8B, weights, "torch", budget=2048, divide_length=128, device=device)
    assert est.weights == weights  # bf16 stays bf16 on a GPU
    assert est.kv_budget == 147456 * 2176 and est.kv_full == 147456 * 40960
    assert est.fits() is True and est.fits_full() is False
    out = text(render(est, 2048))
    assert "fits: weights + KV at budget 2048 need about 16.3 GiB" in out
    assert "would not fit" in out and "20.0 GiB available of 24.0 GiB" in out


def test_cpu_runs_bf16_weights_in_float32_and_quantized_weights_as_stored():
    device = ("system RAM", 16 * GiB, 12 * GiB, False)
    est = estimate(QWEN3_8B, 16 * GiB, "torch", 2048, 128, device=device)
    assert est.weights == 32 * GiB and est.kv_per_token == 147456 * 2
    assert est.fits() is False and "does not fit" in text(render(est, 2048))
    awq = dict(QWEN3_8B, quantization_config={"quant_method": "awq", "bits": 4})
    assert estimate(awq, 5 * GiB, "torch", 2048, 128, device=device).weights == 5 * GiB
    assert estimate(QWEN3_8B, 5 * GiB, "mlx", 2048, 128, device=device).weights == 5 * GiB


def test_unknown_config_or_memory_still_gives_an_answer():
    est = estimate(None, 3 * GiB, "llamacpp", 2048, 128, device=("system RAM", None, None, False))
    assert est.kv_per_token == 0 and est.fits() is None
    assert "free device memory unknown" in text(render(est, 2048))


def test_system_memory_is_read():
    total, available = system_memory()
    assert total and total > 2**28 and (available is None or 0 < available <= total)
