"""int4 AWQ weights: the packing against AWQ's layout, and the Triton dequantizing matmul against a dequantized
matmul on random weights quantized in the test (Triton's interpreter on a CPU, the GPU with TRIATTN_TEST_DEVICE=cuda)."""

import os

import pytest

DEVICE = os.environ.get("TRIATTN_TEST_DEVICE", "cpu")

import torch  # noqa: E402

from triattn_local.backends.torch import int4, int4_kernels, kernels  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(kernels.triton is None or (DEVICE != "cpu" and not kernels.available(DEVICE)),
                                  reason="Triton cannot run here")


def test_packing_follows_awq_nibble_order():
    values = torch.arange(16, dtype=torch.int32).remainder(16).reshape(1, 16)  # columns 0..15
    packed = int4.pack(values)
    # column n lives in nibble AWQ_ORDER[n % 8] of word n // 8: columns 0..7 → nibbles 0,4,1,5,2,6,3,7
    word0 = packed[0, 0].item() & 0xFFFFFFFF
    nibbles = [(word0 >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == [0, 2, 4, 6, 1, 3, 5, 7]
    assert torch.equal(int4.unpack(packed), values)


def test_quantize_then_dequantize_is_close_to_the_weight():
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))  # nn.Linear [out, in]
    qweight, qzeros, scales = int4.quantize(w, group_size=64)
    assert qweight.shape == (256, 12) and qzeros.shape == (4, 12) and scales.shape == (4, 96)
    back = int4.dequantize(qweight, qzeros, scales, 64).float().t()
    step = (w.reshape(96, 4, 64).amax(-1) - w.reshape(96, 4, 64).amin(-1)) / 15
    assert ((back - w).abs().reshape(96, 4, 64) <= step[..., None] / 2 + 1e-3).all()  # within half a step


def random_awq(k, n, group, seed):
    gen = torch.Generator().manual_seed(seed)
    qweight, qzeros, scales = int4.quantize(torch.randn(n, k, generator=gen), group_size=group)
    return gen, qweight, qzeros, scales


def check_against_dequantized(fn, m, k, n, group, dtype, seed):
    """fn(x, qweight, qzeros, scales, group) on DEVICE against x @ int4.dequantize(...) in float32."""
    if dtype != torch.float32 and INTERPRET:
        pytest.skip("Triton's interpreter (numpy) has no bfloat16 arithmetic; the GPU run covers it")
    gen, qweight, qzeros, scales = random_awq(k, n, group, seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    want = x.float() @ int4.dequantize(qweight, qzeros, scales, group)
    got = fn(x.to(DEVICE), qweight.to(DEVICE), qzeros.to(DEVICE), scales.to(DEVICE), group)
    assert got.shape == (m, n) and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float().cpu(), want, rtol=tol, atol=tol * want.abs().max().item())


# K = 4 groups of 32 and N = 72 (not a multiple of the interpreter's 64-column block): several K splits (the
# interpreter counts 4 multiprocessors), a masked N block, and every nibble position of the AWQ order.
@needs_triton
@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_awq_gemv_equals_dequantized_matmul(m, dtype):
    check_against_dequantized(int4_kernels.awq_gemv, m, 128, 72, 32, dtype, seed=m)


@needs_triton
@pytest.mark.parametrize("m", [12, 70])  # 12: split over K with atomics; 70 (> SPLIT_MAX_M): one split, stored
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernels_awq_matmul_equals_dequantized_matmul(m, dtype):
    check_against_dequantized(int4_kernels.awq_matmul, m, 128, 72, 32, dtype, seed=m)


@needs_triton
def test_awq_gemv_with_group_128_and_splits_across_groups():
    # N = 56: one (masked) block, so four splits of 64 rows, two of which start inside a group of 128
    check_against_dequantized(int4_kernels.awq_gemv, 1, 256, 56, 128, torch.float32, seed=7)


def test_split_count_covers_k_without_an_empty_split():
    for n, k, unit, block_n, programs in [(5120, 25600, 8, 1024, 1056), (51200, 5120, 8, 512, 2112),
                                          (5120, 8192, 8, 512, 1056), (72, 128, 8, 64, 4), (64, 64, 64, 64, 1000)]:
        split = int4_kernels.split_count(n, k, unit, block_n, programs)
        units = k // unit
        per_split = -(-units // split)  # as the kernels compute it
        assert 1 <= split <= units and (split - 1) * per_split < units <= split * per_split


@needs_triton
def test_awq_linear_dispatches_by_rows_and_adds_the_bias(monkeypatch):
    """AWQLinear on the Triton path (forced on in the interpreter): decode-sized inputs go through awq_gemv,
    larger ones through awq_matmul, both equal to the dequantized layer."""
    monkeypatch.setattr(int4_kernels, "available", lambda device: True)
    calls = []
    for name in ("awq_gemv", "awq_matmul"):
        real = getattr(int4_kernels, name)
        monkeypatch.setattr(int4_kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    layer = int4.AWQLinear(128, 72, group_size=32, bias=True)
    gen, qweight, qzeros, scales = random_awq(128, 72, 32, seed=3)
    layer.qweight.copy_(qweight)
    layer.qzeros.copy_(qzeros)
    layer.scales.copy_(scales)
    layer.bias.data.normal_(generator=gen)
    layer = layer.to(DEVICE)
    w = int4.dequantize(qweight, qzeros, scales, 32)
    for rows in [(1, 1), (2, 2), (3, 4)]:  # 1 and 4 rows: the gemv; 12: the matmul
        x = torch.randn(*rows, 128, generator=gen)
        want = x @ w + layer.bias.float().cpu()
        torch.testing.assert_close(layer(x.to(DEVICE)).cpu(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert calls == ["awq_gemv", "awq_gemv", "awq_matmul"]


def test_awq_linear_uses_the_same_weights_on_every_path():
    layer = int4.AWQLinear(128, 64, group_size=64, bias=True)
    qweight, qzeros, scales = int4.quantize(torch.randn(64, 128), group_size=64)
    layer.qweight.copy_(qweight)
    layer.qzeros.copy_(qzeros)
    layer.scales.copy_(scales)
    layer.bias.data.normal_()
    x = torch.randn(2, 3, 128)
    want = x @ int4.dequantize(qweight, qzeros, scales, 64).float() + layer.bias.float()
    torch.testing.assert_close(layer(x), want, rtol=1e-3, atol=1e-3)


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_awq_checkpoint(src, dst, group=64):
    """The tiny model with its projections quantized to int4 in the AWQ layout (and a config saying so), plus the
    same model with those weights dequantized back, as the reference."""
    import json
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(".weight") and any(f".{p}." in name for p in PROJECTIONS):
            qweight, qzeros, scales = int4.quantize(tensor, group)
            base = name[: -len(".weight")]
            state[f"{base}.qweight"], state[f"{base}.qzeros"], state[f"{base}.scales"] = qweight, qzeros, scales
            tensor.copy_(int4.dequantize(qweight, qzeros, scales, group).t())  # the reference holds the same values
        else:
            state[name] = tensor.contiguous()
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    save_file(state, str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = dict(quant_method="awq", bits=4, group_size=group, version="gemm",
                                         zero_point=True)
    (dst / "config.json").write_text(json.dumps(config))
    return model


def test_an_awq_checkpoint_loads_and_equals_its_dequantized_model(tiny_model_factory, tmp_path):
    from triattn_local.backends.torch.static_model import StaticKVModel

    reference = write_awq_checkpoint(tiny_model_factory("qwen3"), tmp_path / "awq")
    model = StaticKVModel.from_pretrained(tmp_path / "awq", "cpu", torch.float32)
    attn = model.model.layers[0].self_attn
    assert isinstance(getattr(attn, "qkv_proj", None) or attn.q_proj, int4.AWQLinear)  # fused q/k/v, or not
    model.allocate(1, 64)
    ids = torch.arange(5, 45)[None]
    with torch.no_grad():
        got = model(ids, torch.arange(40), torch.arange(40))
        want = reference(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
