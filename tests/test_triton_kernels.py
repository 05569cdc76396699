"""The Triton kernels against the reference scorer on the shared vectors, and against torch.gather for compaction.

On a machine without a GPU they run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported);
on the device they run compiled on the GPU (TRIATTN_TEST_DEVICE=cuda)."""

import os

import numpy as np
import pytest

DEVICE = os.environ.get("TRIATTN_TEST_DEVICE", "cpu")
pytest.importorskip("triton")

import torch  # noqa: E402

from triattn_local.backends.torch import kernels  # noqa: E402
from triattn_local.backends.torch.cache import score_keys_torch  # noqa: E402
from triattn_local.scorer import TriAttentionScorer  # noqa: E402
from vectors_io import load_vectors  # noqa: E402

pytestmark = pytest.mark.skipif(kernels.triton is None or (DEVICE != "cpu" and not kernels.available(DEVICE)),
                                  reason="Triton cannot run here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_score_kernel_matches_the_shared_vectors(dtype):
    stats, v, meta = load_vectors()
    rq = TriAttentionScorer(stats).round_queries(meta["round_start"])
    for layer in range(stats.meta.num_layers):
        keys = torch.tensor(v["keys"][layer], device=DEVICE)[None]  # [1, Hkv, T, D]
        got = kernels.score_keys(keys.to(dtype), torch.tensor(rq.virtual_query[layer]),
                                 torch.tensor(rq.magnitude_weight[layer]), stats.meta.rope_pairing)
        if dtype == torch.float32:
            np.testing.assert_allclose(got[0].cpu().numpy(), v["head_scores"][layer], rtol=1e-4, atol=1e-4)
        else:  # bf16 keys: equal to the torch fallback on the same rounded keys
            want = score_keys_torch(keys.to(dtype), rq.virtual_query[layer], rq.magnitude_weight[layer])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("pairing", ["half", "adjacent"])
@pytest.mark.parametrize("length", [1, 63, 200])
def test_score_kernel_equals_the_torch_form_on_a_batch_and_a_buffer_prefix(pairing, length):
    """Rows of a batch, a GQA group of 4, both pair layouts, and keys that are a prefix view of a larger buffer."""
    gen = torch.Generator().manual_seed(length)
    buffer = torch.randn(3, 2, 256, 64, generator=gen).to(DEVICE)
    keys = buffer[:, :, :length]
    vq = torch.randn(8, 64, generator=gen)
    mw = torch.rand(8, 32, generator=gen)
    got = kernels.score_keys(keys, vq, mw, pairing)
    want = score_keys_torch(keys, vq.numpy(), mw.numpy(), pairing)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kept", [1, 70, 130])
def test_compaction_in_place_equals_a_gather(kept):
    gen = torch.Generator().manual_seed(kept)
    buffer = torch.randn(2, 3, 160, 64, generator=gen).to(DEVICE)
    keep = torch.sort(torch.stack([torch.stack([torch.randperm(140, generator=gen)[:kept] for _ in range(3)])
                                   for _ in range(2)]), dim=-1).values.to(DEVICE)
    want = torch.gather(buffer, 2, keep[..., None].expand(-1, -1, -1, 64))
    tail = buffer[:, :, 140:].clone()
    kernels.compact_(buffer, keep, block_t=32)  # several blocks per row: sources overlap later destinations
    torch.testing.assert_close(buffer[:, :, :kept], want, rtol=0, atol=0)
    torch.testing.assert_close(buffer[:, :, 140:], tail, rtol=0, atol=0)  # slots past the kept ones untouched


def test_scoring_every_layer_in_one_launch_equals_scoring_each_layer():
    """keys [L·B, Hkv, T, D] (a view of the whole static cache) with per-layer virtual queries [L, H, D]."""
    gen = torch.Generator().manual_seed(5)
    cache = torch.randn(3, 2, 2, 96, 32, generator=gen).to(DEVICE)  # [L, B, Hkv, C, D]
    vq, mw = torch.randn(3, 4, 32, generator=gen), torch.rand(3, 4, 16, generator=gen)
    got = kernels.score_keys(cache[:, :, :, :70].flatten(0, 1), vq, mw).unflatten(0, (3, 2))
    for layer in range(3):
        want = kernels.score_keys(cache[layer, :, :, :70], vq[layer], mw[layer])
        torch.testing.assert_close(got[layer], want, rtol=0, atol=0)
