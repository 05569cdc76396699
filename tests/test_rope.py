"""Our numpy RoPE (triattn_local.rope) against the rotary embedding transformers actually runs.

The scorer predicts attention logits from ω_f and s_f alone, so any mismatch with the model's own cos/sin would
silently mis-rank keys. HF computes in float32, so angles p·ω carry an error of about p·ω·1e-7; the cos/sin
tolerance grows with the angle, while inv_freq itself is compared tightly.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from triattn_local.errors import UserError
from triattn_local.rope import ModelShape, to_complex_pairs

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, Qwen3Config  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding  # noqa: E402

POSITIONS = [0, 1, 7, 1000, 30000]

# (id, config class, rotary class, head_dim, max_position_embeddings, rope_parameters in transformers-5 layout)
CASES = [
    ("default-10k-d64", LlamaConfig, LlamaRotaryEmbedding, 64, 4096, {"rope_type": "default", "rope_theta": 10000.0}),
    ("default-1m-d128", Qwen3Config, Qwen3RotaryEmbedding, 128, 40960, {"rope_type": "default", "rope_theta": 1e6}),
    ("linear-2", LlamaConfig, LlamaRotaryEmbedding, 128, 8192,
     {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    ("linear-4-d64", Qwen3Config, Qwen3RotaryEmbedding, 64, 16384,
     {"rope_type": "linear", "rope_theta": 5e5, "factor": 4.0}),
    (
        "llama3.1",
        LlamaConfig,
        LlamaRotaryEmbedding,
        128,
        131072,
        {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},
    ),
    (
        "llama3.2",
        LlamaConfig,
        LlamaRotaryEmbedding,
        64,
        131072,
        {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},
    ),
    (
        "llama3-tiny",  # as tests/tiny_models.py: short original context, so all three bands are populated
        LlamaConfig,
        LlamaRotaryEmbedding,
        64,
        4096,
        {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 512},
    ),
    (
        "yarn-qwen3",
        Qwen3Config,
        Qwen3RotaryEmbedding,
        128,
        131072,
        {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768},
    ),
    (
        "yarn-no-truncate",
        LlamaConfig,
        LlamaRotaryEmbedding,
        64,
        131072,
        {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "original_max_position_embeddings": 4096,
         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False},
    ),
    (
        "yarn-betas",
        Qwen3Config,
        Qwen3RotaryEmbedding,
        128,
        65536,
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 8192,
         "beta_fast": 16.0, "beta_slow": 2.0},
    ),
    (
        "yarn-mscale",  # DeepSeek style: attention factor from mscale / mscale_all_dim
        LlamaConfig,
        LlamaRotaryEmbedding,
        64,
        163840,
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
         "mscale": 1.0, "mscale_all_dim": 0.5},
    ),
    (
        "yarn-attention-factor",
        Qwen3Config,
        Qwen3RotaryEmbedding,
        128,
        131072,
        {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768,
         "attention_factor": 1.25},
    ),
]


def _hf_config(config_cls, head_dim: int, max_pos: int, rope_parameters: dict):
    return config_cls(
        vocab_size=64,
        hidden_size=2 * head_dim,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters=dict(rope_parameters),
    )


def _angle_atol(positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """float32 angles p·ω are good to ~1e-7 relative: allow a few ulps of the angle, plus cos/sin's own rounding."""
    return 2e-6 + 5e-7 * positions[:, None] * inv_freq[None, :]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rope_frequencies_match_transformers(case):
    _, config_cls, rotary_cls, head_dim, max_pos, rope_parameters = case
    config = _hf_config(config_cls, head_dim, max_pos, rope_parameters)
    rotary = rotary_cls(config)
    shape = ModelShape.from_hf_config(config.to_dict())
    assert shape.rope_type == rope_parameters["rope_type"]
    assert shape.head_dim == head_dim
    inv_freq, scale = shape.rope_frequencies()

    np.testing.assert_allclose(inv_freq, rotary.inv_freq.double().numpy(), rtol=2e-6, atol=0)
    np.testing.assert_allclose(scale, np.full(head_dim // 2, rotary.attention_scaling), rtol=1e-12)

    pos = np.array(POSITIONS, dtype=np.float64)
    x = torch.zeros(1, len(POSITIONS), head_dim, dtype=torch.float32)
    cos, sin = rotary(x, torch.tensor([POSITIONS]))
    cos, sin = cos[0].double().numpy(), sin[0].double().numpy()
    assert cos.shape == (len(POSITIONS), head_dim)

    angle = pos[:, None] * inv_freq[None, :]
    atol = np.tile(_angle_atol(pos, inv_freq) * scale, 2)
    expect_cos = np.concatenate([np.cos(angle) * scale] * 2, axis=-1)  # HF layout: cat(freqs, freqs)
    expect_sin = np.concatenate([np.sin(angle) * scale] * 2, axis=-1)
    assert np.all(np.abs(cos - expect_cos) <= atol), np.abs(cos - expect_cos).max()
    assert np.all(np.abs(sin - expect_sin) <= atol), np.abs(sin - expect_sin).max()


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("default-1m-d128", "llama3.1", "yarn-mscale")],
                         ids=["default", "llama3", "yarn"])
def test_hf_rotation_is_complex_multiplication(case):
    """HF's q·cos + rotate_half(q)·sin is, in 'half' pairing, the complex product q_f · s_f · e^{i p ω_f}."""
    _, config_cls, rotary_cls, head_dim, max_pos, rope_parameters = case
    config = _hf_config(config_cls, head_dim, max_pos, rope_parameters)
    rotary = rotary_cls(config)
    inv_freq, scale = ModelShape.from_hf_config(config.to_dict()).rope_frequencies()

    positions = [0, 1, 7, 1000, 30000]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 3, len(positions), head_dim, generator=gen)  # [B, H, T, D]
    cos, sin = rotary(q, torch.tensor([positions]))
    q_rot, k_rot = apply_rotary_pos_emb(q, q.clone(), cos, sin)
    assert torch.equal(q_rot, k_rot)

    pos = np.array(positions, dtype=np.float64)
    z = to_complex_pairs(q.double().numpy())  # [1, H, T, D/2]
    expect = z * scale * np.exp(1j * pos[:, None] * inv_freq[None, :])
    got = to_complex_pairs(q_rot.double().numpy())
    atol = _angle_atol(pos, inv_freq) * scale * (np.abs(z) + 1)  # the angle error scales with |q_f|
    assert np.all(np.abs(got - expect) <= atol), np.abs(got - expect).max()


BASE_CFG = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=256, num_attention_heads=4,
    num_key_value_heads=2, num_hidden_layers=3, head_dim=64, max_position_embeddings=40960,
)

# (transformers 4 style: rope_theta + rope_scaling, transformers 5 style: rope_parameters)
LAYOUT_PAIRS = [
    (dict(rope_theta=1e6), dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    (
        dict(rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0}),
        dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
    ),
    (
        dict(rope_theta=5e5, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    ),
    (
        dict(rope_theta=1e6, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
        dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                              "original_max_position_embeddings": 32768}),
    ),
]


@pytest.mark.parametrize("v4, v5", LAYOUT_PAIRS, ids=["default", "linear", "llama3", "yarn"])
def test_config_layouts_read_identically(v4, v5):
    shape4 = ModelShape.from_hf_config(dict(BASE_CFG, **v4))
    shape5 = ModelShape.from_hf_config(dict(BASE_CFG, **v5))
    assert shape4 == shape5
    # and what transformers itself makes of the old layout reads the same too
    shape_hf = ModelShape.from_hf_config(Qwen3Config(**dict(BASE_CFG, **v4)).to_dict())
    assert (shape_hf.rope_type, shape_hf.rope_theta, shape_hf.rope_scaling) == (
        shape5.rope_type, shape5.rope_theta, shape5.rope_scaling)
    for a, b in zip(shape4.rope_frequencies(), shape5.rope_frequencies()):
        np.testing.assert_array_equal(a, b)


def test_missing_original_max_position_defaults_like_transformers():
    """transformers fills original_max_position_embeddings from max_position_embeddings for yarn/llama3."""
    cfg = dict(BASE_CFG, max_position_embeddings=8192, rope_theta=1e6,
               rope_scaling={"rope_type": "yarn", "factor": 4.0})
    inv_freq, scale = ModelShape.from_hf_config(cfg).rope_frequencies()
    rotary = Qwen3RotaryEmbedding(Qwen3Config(**cfg))
    np.testing.assert_allclose(inv_freq, rotary.inv_freq.double().numpy(), rtol=2e-6)
    np.testing.assert_allclose(scale, rotary.attention_scaling, rtol=1e-12)


@pytest.mark.parametrize(
    "rope",
    [
        dict(rope_scaling={"type": "dynamic", "factor": 2.0}),
        dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 32,
                              "long_factor": [2.0] * 32}),
        dict(rope_parameters={"rope_type": "mrope", "rope_theta": 1e4}),
    ],
    ids=["dynamic", "longrope", "unknown"],
)
def test_unsupported_rope_type_is_user_error(rope):
    with pytest.raises(UserError, match="unsupported rope type"):
        ModelShape.from_hf_config(dict(BASE_CFG, **rope))


def test_partial_rotary_is_user_error():
    with pytest.raises(UserError, match="partial"):
        ModelShape.from_hf_config(dict(BASE_CFG, rope_theta=1e4, partial_rotary_factor=0.5))
