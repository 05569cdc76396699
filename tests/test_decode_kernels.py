"""The fused decode kernels (decode_kernels.py) against their torch forms, and the fused decode step of the static
model against its unfused forward, in Triton's interpreter on a CPU (on the GPU with TRIATTN_TEST_DEVICE=cuda)."""

import os

import pytest

DEVICE = os.environ.get("TRIATTN_TEST_DEVICE", "cpu")
pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from triattn_local.backends.torch import decode_kernels as dk  # noqa: E402
from triattn_local.backends.torch import kernels  # noqa: E402
from triattn_local.backends.torch.static_model import RMSNorm, rotate_half  # noqa: E402

pytestmark = pytest.mark.skipif(dk.triton is None or (DEVICE != "cpu" and not kernels.available(DEVICE)),
                                reason="Triton cannot run here")
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE != "cpu" else [])  # the interpreter has no bf16 dot


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_with_and_without_the_residual_add(dtype, with_residual):
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(96, 1e-6)
    norm.weight.data = torch.rand(96, generator=gen) + 0.5
    norm = norm.to(DEVICE, dtype)
    x = torch.randn(3, 96, generator=gen).to(DEVICE, dtype)
    residual = torch.randn(3, 96, generator=gen).to(DEVICE, dtype)
    want_h = residual + x if with_residual else x
    want = norm(want_h)
    res = residual.clone()
    got = dk.rms_norm(x, norm.weight, norm.eps, residual=res if with_residual else None)
    torch.testing.assert_close(got, want, **tol(dtype))
    if with_residual:
        torch.testing.assert_close(res, want_h, rtol=0, atol=0)  # the residual stream, updated in place


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [False, True])
def test_qk_norm_rope_cache_writes_the_slot_and_returns_the_rotated_query(dtype, with_norm):
    gen = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, dim, capacity, slot = 2, 4, 2, 32, 12, 7
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=gen).to(DEVICE, dtype)
    angles = torch.rand(dim // 2, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2).to(DEVICE, dtype), torch.cat([angles.sin()] * 2).to(DEVICE, dtype)
    qn, kn = RMSNorm(dim, 1e-6).to(DEVICE, dtype), RMSNorm(dim, 1e-6).to(DEVICE, dtype)
    qn.weight.data.uniform_(0.5, 1.5)
    kn.weight.data.uniform_(0.5, 1.5)
    k_cache = torch.zeros(batch, kv_heads, capacity, dim, device=DEVICE, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    q = dk.qk_norm_rope_cache(qkv, qn.weight if with_norm else None, kn.weight if with_norm else None, 1e-6,
                              cos, sin, k_cache, v_cache, torch.tensor([slot], device=DEVICE), heads)
    wq, wk, wv = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    wq, wk, wv = wq.view(batch, heads, dim), wk.view(batch, kv_heads, dim), wv.view(batch, kv_heads, dim)
    if with_norm:
        wq, wk = qn(wq), kn(wk)
    torch.testing.assert_close(q, wq * cos + rotate_half(wq) * sin, **tol(dtype))
    torch.testing.assert_close(k_cache[:, :, slot], wk * cos + rotate_half(wk) * sin, **tol(dtype))
    torch.testing.assert_close(v_cache[:, :, slot], wv, rtol=0, atol=0)
    others = [t for t in range(capacity) if t != slot]
    assert not k_cache[:, :, others].any() and not v_cache[:, :, others].any()  # no other slot touched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,capacity,slot", [(4, 300, 0), (4, 300, 129), (1, 100, 99), (8, 700, 650)])
def test_decode_attention_equals_masked_sdpa_over_the_filled_slots(dtype, group, capacity, slot):
    gen = torch.Generator().manual_seed(slot)
    batch, kv_heads, dim = 2, 2, 64
    heads = kv_heads * group
    q = torch.randn(batch, heads, dim, generator=gen).to(DEVICE, dtype)
    k_cache = torch.randn(batch, kv_heads, capacity, dim, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(batch, kv_heads, capacity, dim, generator=gen).to(DEVICE, dtype)
    k_cache[:, :, slot + 1:] = 1e4  # stale slots past the filled ones must not count
    got = dk.decode_attention(q, k_cache, v_cache, torch.tensor([slot], device=DEVICE), dim ** -0.5)
    want = F.scaled_dot_product_attention(q[:, :, None].float(), k_cache[:, :, :slot + 1].float(),
                                          v_cache[:, :, :slot + 1].float(), enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(got.float(), want, **tol(dtype))


def test_attention_splits_cover_the_capacity_in_whole_blocks():
    for batch, capacity in [(1, 2176), (16, 2176), (1, 33153), (4, 64), (1, 1)]:
        splits, per_split = dk.attention_splits(batch, 8, capacity, torch.device("cpu"))
        assert per_split % dk.BLOCK_T == 0 and splits * per_split >= capacity > (splits - 1) * per_split
        assert 1 <= splits <= dk.MAX_SPLITS


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    x = torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(dk.silu_mul(x), F.silu(gate) * up, **tol(dtype))


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_fused_decode_step_equals_the_unfused_forward(arch, tiny_model_factory):
    """Prefill, then decode steps through both paths on copies of the same cache: same logits, same cache."""
    from transformers import AutoModelForCausalLM

    from triattn_local.backends.torch.static_model import StaticKVModel

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_factory(arch)), dtype=torch.float32).to(DEVICE)
    model = StaticKVModel.from_hf(hf)
    model.allocate(2, 48)
    prompt = torch.randint(5, 300, (2, 20), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.inference_mode():
        model(prompt, torch.arange(100, 120, device=DEVICE), torch.arange(20, device=DEVICE))
        tokens = prompt[:, -1:]
        for step in range(3):
            slot, position = torch.tensor([20 + step], device=DEVICE), torch.tensor([120 + step], device=DEVICE)
            k0, v0 = model.k_cache.clone(), model.v_cache.clone()
            model.fused_decode = False
            want = model(tokens, position, slot)
            k_want, v_want = model.k_cache.clone(), model.v_cache.clone()
            model.k_cache.copy_(k0)
            model.v_cache.copy_(v0)
            model.fused_decode = True
            got = model(tokens, position, slot)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(model.k_cache, k_want, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(model.v_cache, v_want, rtol=1e-4, atol=1e-4)
            tokens = got.argmax(-1, keepdim=True)
    # the transformers model still works on its (re-pointed) weights and agrees with the static model
    with torch.inference_mode():
        ref = hf(input_ids=prompt, position_ids=torch.arange(100, 120, device=DEVICE)[None].expand(2, -1)).logits
        model.fused_decode = False
        model.allocate(2, 48)
        mine = model(prompt, torch.arange(100, 120, device=DEVICE), torch.arange(20, device=DEVICE))
    torch.testing.assert_close(mine, ref[:, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(100, 96), (7, 1500)])
def test_gemv_equals_a_linear_layer(dtype, n, k):
    gen = torch.Generator().manual_seed(n)
    layer = torch.nn.Linear(k, n, bias=True).to(DEVICE, dtype)
    x = torch.randn(1, k, generator=gen).to(DEVICE, dtype)
    torch.testing.assert_close(dk.gemv(x, layer.weight), x @ layer.weight.t(), **tol(dtype))
    if dtype != torch.float32:  # dk.linear routes half-precision single rows through gemv, others to the module
        torch.testing.assert_close(dk.linear(x, layer), layer(x), **tol(dtype))
    torch.testing.assert_close(dk.linear(x.expand(3, -1), layer), layer(x.expand(3, -1)), rtol=0, atol=0)


def test_fused_lanes_equal_the_unfused_lanes(tiny_model_factory):
    """Continuous batching's step: lanes at their own positions and slots, in cache rows of their own (one row
    skipped, one lane on a row after another's): the fused kernels give the unfused logits and caches."""
    from transformers import AutoModelForCausalLM

    from triattn_local.backends.torch.static_model import StaticKVModel

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_factory("qwen3")), dtype=torch.float32).to(DEVICE)
    model = StaticKVModel.from_hf(hf)
    model.allocate(4, 300)
    gen = torch.Generator().manual_seed(5)
    k0 = torch.randn(model.k_cache.shape, generator=gen).to(DEVICE)
    v0 = torch.randn(model.v_cache.shape, generator=gen).to(DEVICE)
    tokens = torch.tensor([[11], [12], [13]], device=DEVICE)
    positions, slots = torch.tensor([30, 7, 1000], device=DEVICE), torch.tensor([10, 270, 0], device=DEVICE)
    rows = torch.tensor([2, 0, 3], device=DEVICE)
    results = []
    with torch.inference_mode():
        for fused in (False, True):
            model.k_cache.copy_(k0)
            model.v_cache.copy_(v0)
            model.fused_decode = fused
            results.append((model.decode(tokens, positions, slots, rows), model.k_cache.clone(),
                            model.v_cache.clone()))
        (want, k_want, v_want), (got, k_got, v_got) = results
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(k_got, k_want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v_got, v_want, rtol=1e-4, atol=1e-4)
        assert torch.equal(k_got[:, 1], k0[:, 1])  # the row no lane uses
        # and each lane equals its row decoded alone
        for lane in range(3):
            model.k_cache.copy_(k0)
            model.v_cache.copy_(v0)
            one = model.decode(tokens[lane:lane + 1], positions[lane:lane + 1], slots[lane:lane + 1],
                               rows[lane:lane + 1])
            torch.testing.assert_close(one[0], got[lane], rtol=1e-4, atol=1e-4)
