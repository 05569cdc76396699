"""Stats format v1: save/load round trip, refusal of corrupt files and of stats made for another model."""

from __future__ import annotations

import numpy as np
import pytest

from triattn_local.errors import UserError
from triattn_local.rope import ModelShape
from triattn_local.stats.format import QueryStats, meta_for_model

CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 4096,
}


def make_stats(config: dict = CONFIG, seed: int = 0, **meta) -> QueryStats:
    """Random but plausible stats for the model of a config dict: |E q| <= E|q| per frequency."""
    shape = ModelShape.from_hf_config(config)
    rng = np.random.default_rng(seed)
    dims = (shape.num_layers, shape.num_heads, shape.num_freqs)
    real = rng.normal(size=dims).astype(np.float32)
    imag = rng.normal(size=dims).astype(np.float32)
    abs_mean = (np.hypot(real, imag) * rng.uniform(1.0, 3.0, size=dims)).astype(np.float32)
    inv_freq, freq_scale = shape.rope_frequencies()
    m = meta_for_model(shape, "test/model", calibration_tokens=1234, calibration_text_sha256="ab" * 32, **meta)
    return QueryStats(m, real, imag, abs_mean, inv_freq, freq_scale)


def assert_same(a: QueryStats, b: QueryStats) -> None:
    assert a.meta == b.meta
    for name in ("q_mean_real", "q_mean_imag", "q_abs_mean", "inv_freq", "freq_scale"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name


def test_round_trip(tmp_path):
    stats = make_stats()
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    back = QueryStats.load(path)
    assert_same(stats, back)
    assert back.q_mean_real.dtype == np.float32 and back.inv_freq.dtype == np.float64
    assert back.q_mean_real.shape == (3, 4, 8)
    back.check_matches(ModelShape.from_hf_config(CONFIG))


def test_round_trip_keeps_yarn_scaling_and_reference_metadata(tmp_path):
    config = dict(
        CONFIG,
        rope_theta=150000,
        rope_scaling={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "truncate": False},
    )
    ref = {"rope_style": "half", "head_dim": 16, "model_name": "x/y", "rope_theta": 150000, "sampled_heads": [[0, 0]]}
    stats = make_stats(config, reference_metadata=ref)
    assert stats.freq_scale[0] > 1  # yarn attention factor
    stats.save(tmp_path / "s.safetensors")
    back = QueryStats.load(tmp_path / "s.safetensors")
    assert_same(stats, back)
    assert back.meta.reference_metadata == ref
    assert list(back.meta.reference_metadata) == list(ref)
    assert back.meta.rope_scaling == {"factor": 32.0, "original_max_position_embeddings": 4096, "truncate": False}


def test_save_leaves_no_temp_file(tmp_path):
    make_stats().save(tmp_path / "sub" / "s.safetensors")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["s.safetensors"]


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        QueryStats.load(tmp_path / "nope.safetensors")


def _one_line_user_error(path) -> str:
    with pytest.raises(UserError) as e:
        QueryStats.load(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_random_bytes_refused(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    _one_line_user_error(path)


def test_truncated_file_refused(tmp_path):
    path = tmp_path / "s.safetensors"
    make_stats().save(path)
    data = path.read_bytes()
    for cut in (4, 100, len(data) - 10):
        path.write_bytes(data[:cut])
        _one_line_user_error(path)


def test_foreign_safetensors_refused(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "model.safetensors"
    save_file({"weight": np.zeros((2, 2), dtype=np.float32)}, str(path))
    assert "not a triattn stats file" in _one_line_user_error(path)
    save_file({"weight": np.zeros(2, dtype=np.float32)}, str(path), metadata={"format": "pt"})
    assert "not a triattn stats file" in _one_line_user_error(path)


def test_missing_tensor_refused(tmp_path):
    from safetensors.numpy import save_file

    stats = make_stats()
    path = tmp_path / "s.safetensors"
    save_file({"q_mean_real": stats.q_mean_real}, str(path), metadata=stats.meta.to_strings())
    assert "missing tensors" in _one_line_user_error(path)


def test_wrong_version_and_bad_shape_refused(tmp_path):
    from safetensors.numpy import save_file

    stats = make_stats()
    tensors = {n: getattr(stats, n) for n in ("q_mean_real", "q_mean_imag", "q_abs_mean", "inv_freq", "freq_scale")}
    path = tmp_path / "s.safetensors"
    save_file(tensors, str(path), metadata=dict(stats.meta.to_strings(), format_version="2"))
    assert "version 2" in _one_line_user_error(path)
    save_file(tensors, str(path), metadata=dict(stats.meta.to_strings(), num_layers="5"))
    assert "shape" in _one_line_user_error(path)
    save_file(tensors, str(path), metadata=dict(stats.meta.to_strings(), num_layers="three"))
    assert "corrupt stats metadata" in _one_line_user_error(path)


def test_non_finite_values_refused(tmp_path):
    stats = make_stats()
    stats.q_abs_mean[0, 0, 0] = np.nan
    with pytest.raises(UserError, match="NaN"):
        stats.save(tmp_path / "s.safetensors")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"num_hidden_layers": 4}, "num_layers is 3 in the stats, 4 in the model"),
        ({"num_attention_heads": 8, "head_dim": 16}, "num_heads is 4 in the stats, 8 in the model"),
        ({"num_key_value_heads": 4}, "num_kv_heads is 2 in the stats, 4 in the model"),
        ({"head_dim": 32}, "head_dim is 16 in the stats, 32 in the model"),
        ({"rope_theta": 10000.0}, "rope_theta 1e+06 vs 10000"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type is default in the stats, linear in the model"),
    ],
)
def test_mismatched_model_refused(change, words):
    stats = make_stats()
    other = ModelShape.from_hf_config(dict(CONFIG, **change))
    with pytest.raises(UserError) as e:
        stats.check_matches(other, where="s.safetensors")
    assert words in str(e.value)
    assert "do not match the model" in str(e.value)


def test_concentration_is_one_for_fixed_queries():
    """Queries that always point the same way (per frequency) have |E q| = E|q|: concentration 1."""
    stats = make_stats()
    fixed = stats.with_meta()
    fixed.q_abs_mean = np.hypot(stats.q_mean_real, stats.q_mean_imag).astype(np.float32)
    assert np.allclose(fixed.concentration(), 1.0, atol=1e-6)
    assert fixed.concentration().shape == (3, 4)


def test_concentration_lower_for_spread_queries():
    """Sample queries around a centre; more spread means a lower mean resultant length."""
    rng = np.random.default_rng(3)
    centre = rng.normal(size=8) + 1j * rng.normal(size=8)
    figures = []
    for spread in (0.0, 0.3, 1.0, 3.0):
        q = centre + spread * (rng.normal(size=(20000, 8)) + 1j * rng.normal(size=(20000, 8)))
        stats = make_stats()
        n = stats.q_mean_real.shape[:2]
        stats.q_mean_real = np.broadcast_to(q.mean(0).real, n + (8,)).astype(np.float32)
        stats.q_mean_imag = np.broadcast_to(q.mean(0).imag, n + (8,)).astype(np.float32)
        stats.q_abs_mean = np.broadcast_to(np.abs(q).mean(0), n + (8,)).astype(np.float32)
        figures.append(float(np.median(stats.concentration())))
    assert figures[0] == pytest.approx(1.0, abs=1e-6)
    assert figures == sorted(figures, reverse=True) and figures[-1] < 0.5


def test_stats_show_summary_without_torch():
    """`triattn stats show` needs neither torch nor a model: it reads only the stats."""
    from rich.console import Console

    from triattn_local.stats.reference import render_stats

    stats = make_stats()
    console = Console(record=True, width=100, color_system=None)
    render_stats(stats, console)
    text = console.export_text()
    conc = stats.concentration()
    for words in ("test/model", "Qwen3ForCausalLM", "3 layers, 4 heads, 2 kv heads, head_dim 16", "1234 tokens",
                  "ab" * 32, "triattn calibrate", f"median {np.median(conc):.3f}", f"min {conc.min():.3f}",
                  f"max {conc.max():.3f}", "L  0-2 "):
        assert words in text, words


def test_reference_io_without_torch_is_a_user_error(monkeypatch, tmp_path):
    import sys

    from triattn_local.stats.reference import export_reference, import_reference

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(UserError, match=r"triattn-local\[torch\]"):
        import_reference(tmp_path / "x.pt", tmp_path)
    with pytest.raises(UserError, match=r"triattn-local\[torch\]"):
        export_reference(make_stats(), tmp_path / "x.pt")
