"""The reference scorer: its fast virtual-query form against the formula evaluated literally."""

import numpy as np
import pytest

from triattn_local.rope import ModelShape, from_complex_pairs, to_complex_pairs
from triattn_local.scorer import TriAttentionScorer, geometric_offsets
from triattn_local.stats.format import QueryStats, meta_for_model
from vectors_io import load_vectors, policy_keep

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, hidden_size=192, head_dim=32, rope_theta=50000.0, max_position_embeddings=8192)


def random_stats(config=CONFIG, seed=0, yarn=False):
    cfg = dict(config)
    if yarn:
        cfg["rope_scaling"] = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=2048)
    shape = ModelShape.from_hf_config(cfg)
    rng = np.random.default_rng(seed)
    f = shape.head_dim // 2
    size = (shape.num_layers, shape.num_heads, f)
    real, imag = rng.normal(size=size), rng.normal(size=size)
    inv, scale = shape.rope_frequencies()
    return QueryStats(meta_for_model(shape, "t"), real.astype(np.float32), imag.astype(np.float32),
                      (np.hypot(real, imag) + rng.random(size)).astype(np.float32), inv, scale)


def literal_score(stats, layer, head, key_row, t_values, aggregate):
    """Σ_f s_f² Re(q̄_f conj(k_f) e^{i t ω_f}) + Σ_f s_f² (m_f − |q̄_f|)|k_f|, one offset at a time."""
    q = stats.q_mean_real[layer, head].astype(np.float64) + 1j * stats.q_mean_imag[layer, head]
    m = stats.q_abs_mean[layer, head].astype(np.float64)
    s2 = stats.freq_scale ** 2
    k = to_complex_pairs(key_row.astype(np.float64), stats.meta.rope_pairing)
    values = []
    for t in t_values:
        trig = sum(s2[f] * (q[f] * np.conj(k[f]) * np.exp(1j * t * stats.inv_freq[f])).real for f in range(len(k)))
        values.append(trig + np.sum(s2 * (m - np.abs(q)) * np.abs(k)))
    return np.mean(values) if aggregate == "mean" else np.max(values)


@pytest.mark.parametrize("aggregate", ["mean", "max"])
@pytest.mark.parametrize("yarn", [False, True])
def test_fast_form_equals_literal_formula(aggregate, yarn):
    stats = random_stats(yarn=yarn)
    scorer = TriAttentionScorer(stats, offset_aggregation=aggregate)
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(2, 5, 32))
    round_start = 1234
    t_values = round_start + geometric_offsets()
    for layer in range(2):
        got = scorer.head_scores(layer, keys, round_start)
        for head in range(6):
            for j in range(5):
                want = literal_score(stats, layer, head, keys[head // 3, j], t_values, aggregate)
                assert got[head, j] == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_scores_do_not_depend_on_pair_layout():
    """The same key stored half-split or interleaved scores the same under the matching layout."""
    stats = random_stats()
    stats_i = stats.with_meta(rope_pairing="interleaved")
    rng = np.random.default_rng(2)
    keys_half = rng.normal(size=(2, 7, 32))
    keys_inter = from_complex_pairs(to_complex_pairs(keys_half, "half"), "interleaved")
    a = TriAttentionScorer(stats).head_scores(0, keys_half, 500)
    b = TriAttentionScorer(stats_i).head_scores(0, keys_inter, 500)
    np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_complex_pairs_round_trip_and_cast_as_astype(pairing):
    """to/from complex pairs are inverses in both layouts, and writing as float32 rounds exactly as astype does (the
    round's virtual queries are made that way)."""
    x = np.random.default_rng(3).normal(size=(3, 4, 32))
    z = to_complex_pairs(x, pairing)
    np.testing.assert_array_equal(from_complex_pairs(z, pairing), x)
    cast = from_complex_pairs(z, pairing, np.float32)
    assert cast.dtype == np.float32
    np.testing.assert_array_equal(cast, x.astype(np.float32))


def test_score_prefers_keys_aligned_with_the_query_centre():
    """A key rotated to meet the mean query at future positions outscores the opposite key."""
    stats = random_stats()
    scorer = TriAttentionScorer(stats)
    rq = scorer.round_queries(100)
    aligned = rq.virtual_query[0, 0] / np.linalg.norm(rq.virtual_query[0, 0])
    keys = np.stack([aligned, -aligned])[None].repeat(2, axis=0)
    s = scorer.head_scores(0, keys, 100)
    assert s[0, 0] > s[0, 1]


def test_gqa_groups_use_their_own_kv_head():
    stats = random_stats()
    scorer = TriAttentionScorer(stats)
    keys = np.zeros((2, 3, 32))
    keys[1] = 1.0  # only KV head 1 has non-zero keys
    s = scorer.head_scores(0, keys, 10)
    assert np.all(s[:3] == 0) and np.all(s[3:] != 0)


def test_reference_reproduces_shared_vectors():
    """The vectors in tests/vectors were made by this scorer and policy; any change to either shows here."""
    stats, v, meta = load_vectors()
    scorer = TriAttentionScorer(stats)
    for layer in range(stats.meta.num_layers):
        np.testing.assert_allclose(scorer.head_scores(layer, v["keys"][layer], meta["round_start"]),
                                   v["head_scores"][layer], rtol=1e-5, atol=1e-5)
    for mode in ("per_layer_head", "per_head", "global"):
        np.testing.assert_array_equal(policy_keep(stats, meta, v, v["head_scores"], mode), v[f"keep_{mode}"])
