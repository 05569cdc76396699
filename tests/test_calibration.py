"""calibrate() against pre-RoPE query stats computed independently from one full forward pass.

The reference stats are built here without calibrate's hooks, chunking or cache: we capture each attention's input
hidden states, redo q_proj (and q_norm where the model has one) by hand, pair with 'half', and average. Agreement
shows that chunks see their earlier context with continuing positions, and that Qwen3's q_norm is included.
"""

from __future__ import annotations

import hashlib
from importlib import resources

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from triattn_local.errors import UserError
from triattn_local.rope import ModelShape, to_complex_pairs
from triattn_local.stats.format import QueryStats

pytest.importorskip("transformers")
from triattn_local.backends.torch.calibrate import SOURCE, calibrate  # noqa: E402
from triattn_local.calibration import calibration_token_ids  # noqa: E402
from triattn_local.calibration_text import default_calibration_text, load_calibration_text  # noqa: E402

N_TOKENS = 600
CHUNK = 128  # 600 tokens → 5 chunks, the last one partial


@pytest.fixture(scope="module", params=["qwen3", "qwen2", "llama"])
def tiny(request, tiny_model_factory):
    """(model dir, model, tokenizer) for each architecture; Qwen3's q_norm weights made non-trivial."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_factory(request.param)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            q_norm = getattr(layer.self_attn, "q_norm", None)
            if q_norm is not None:  # freshly initialised RMSNorm weights are all ones: make them matter
                q_norm.weight.copy_(0.5 + torch.rand(q_norm.weight.shape, generator=gen))
    return request.param, path, model, tokenizer


def _reference_stats(model, ids: list[int]):
    """Per-layer (mean q_f, mean |q_f|) from a single uncached forward pass, recomputing q from attention inputs."""
    layers = model.model.layers
    inputs: list[torch.Tensor | None] = [None] * len(layers)

    def grab(i):
        def pre_hook(module, args, kwargs):
            inputs[i] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().clone()

        return pre_hook

    handles = [layer.self_attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in handles:
            h.remove()

    means, abs_means = [], []
    with torch.no_grad():
        for layer, h in zip(layers, inputs):
            attn = layer.self_attn
            head_dim = attn.head_dim
            q = attn.q_proj(h).view(*h.shape[:-1], -1, head_dim)  # [1, T, H, D]
            if getattr(attn, "q_norm", None) is not None:
                q = attn.q_norm(q)
            z = to_complex_pairs(q[0].double().numpy(), "half")  # [T, H, D/2]
            means.append(z.mean(axis=0))
            abs_means.append(np.abs(z).mean(axis=0))
    return np.stack(means), np.stack(abs_means)


def test_calibrate_matches_independent_computation(tiny):
    arch, path, model, tokenizer = tiny
    text = default_calibration_text()
    ids = tokenizer(text)["input_ids"][:N_TOKENS]
    assert len(ids) == N_TOKENS

    stats = calibrate(model, tokenizer, text, model_id=f"tiny-{arch}", max_tokens=N_TOKENS, chunk_tokens=CHUNK,
                      progress=False)
    ref_mean, ref_abs = _reference_stats(model, ids)

    shape = ModelShape.from_model_dir(path)
    assert stats.q_mean_real.shape == (shape.num_layers, shape.num_heads, shape.head_dim // 2)
    assert stats.q_mean_real.dtype == np.float32
    np.testing.assert_allclose(stats.q_mean_real, ref_mean.real, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats.q_mean_imag, ref_mean.imag, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats.q_abs_mean, ref_abs, rtol=1e-4, atol=1e-5)
    assert stats.meta.calibration_tokens == N_TOKENS
    assert stats.meta.model_id == f"tiny-{arch}"
    assert stats.meta.source == SOURCE
    inv_freq, scale = shape.rope_frequencies()
    np.testing.assert_array_equal(stats.inv_freq, inv_freq)
    np.testing.assert_array_equal(stats.freq_scale, scale)


def test_qwen3_stats_are_taken_after_q_norm(tiny):
    """Skipping q_norm (as the reference calibration did) would give visibly different stats."""
    arch, _, model, tokenizer = tiny
    if arch != "qwen3":
        pytest.skip("only Qwen3 has q_norm")
    text = default_calibration_text()
    stats = calibrate(model, tokenizer, text, model_id="t", max_tokens=200, chunk_tokens=200, progress=False)
    ids = tokenizer(text)["input_ids"][:200]
    raw = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, out: raw.append(out))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        hook.remove()
    d = model.config.head_dim
    z = to_complex_pairs(raw[0][0].view(len(ids), -1, d).double().numpy())
    assert not np.allclose(stats.q_abs_mean[0], np.abs(z).mean(axis=0), rtol=1e-2)


def test_chunking_does_not_change_result(tiny):
    arch, _, model, tokenizer = tiny
    text = default_calibration_text()
    one = calibrate(model, tokenizer, text, model_id="t", max_tokens=300, chunk_tokens=300, progress=False)
    many = calibrate(model, tokenizer, text, model_id="t", max_tokens=300, chunk_tokens=37, progress=True)
    np.testing.assert_allclose(many.q_mean_real, one.q_mean_real, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(many.q_abs_mean, one.q_abs_mean, rtol=1e-4, atol=1e-5)


def test_hooks_removed_even_on_error(tiny, monkeypatch):
    arch, _, model, tokenizer = tiny

    def q_modules():
        return [getattr(l.self_attn, "q_norm", None) or l.self_attn.q_proj for l in model.model.layers]

    before = [len(m._forward_hooks) for m in q_modules()]
    calibrate(model, tokenizer, "A short text.", model_id="t", progress=False)
    assert [len(m._forward_hooks) for m in q_modules()] == before

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure mid-run")

    monkeypatch.setattr(model.model.norm, "forward", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        calibrate(model, tokenizer, default_calibration_text(), model_id="t", max_tokens=100, chunk_tokens=50,
                  progress=False)
    assert [len(m._forward_hooks) for m in q_modules()] == before


def test_saved_stats_load_and_match_model(tiny, tmp_path):
    arch, path, model, tokenizer = tiny
    text = default_calibration_text()
    stats = calibrate(model, tokenizer, text, model_id=f"tiny-{arch}", max_tokens=128, progress=False)
    out = tmp_path / "stats.safetensors"
    stats.save(out)
    loaded = QueryStats.load(out)
    loaded.check_matches(ModelShape.from_model_dir(path))
    assert loaded.meta == stats.meta
    np.testing.assert_array_equal(loaded.q_abs_mean, stats.q_abs_mean)
    assert loaded.meta.calibration_text_sha256 == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_empty_text_is_user_error(tiny):
    _, _, model, tokenizer = tiny
    with pytest.raises(UserError, match="no tokens"):
        calibrate(model, tokenizer, "", model_id="t", progress=False)


def test_calibration_text_ships():
    path = resources.files("triattn_local") / "data" / "calibration.txt"
    assert path.is_file()
    text = default_calibration_text()
    assert 40_000 <= len(text.encode("utf-8")) <= 60_000
    assert text == path.read_text(encoding="utf-8")
    assert load_calibration_text(None) == text


def test_calibration_token_ids_limit():
    class Tok:
        def __call__(self, text, **kwargs):
            return {"input_ids": [ord(c) for c in text]}

    assert calibration_token_ids(Tok(), "abcdef") == [97, 98, 99, 100, 101, 102]
    assert calibration_token_ids(Tok(), "abcdef", max_tokens=2) == [97, 98]


def test_load_calibration_text_user_file(tmp_path):
    good = tmp_path / "mine.txt"
    good.write_text("Some calibration prose, with ünïcode.\n", encoding="utf-8")
    assert load_calibration_text(str(good)) == "Some calibration prose, with ünïcode.\n"

    with pytest.raises(UserError, match="not found"):
        load_calibration_text(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="not found"):
        load_calibration_text(str(tmp_path))  # a directory is not a text file
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        load_calibration_text(str(empty))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8"):
        load_calibration_text(str(latin))
