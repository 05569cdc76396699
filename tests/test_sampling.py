"""The sampler: the partial-sort nucleus on the host and the torch form for GPUs keep the same tokens as a full sort,
and draw from the same distribution as the full-sort sampler they replaced (a chi-square test)."""

import numpy as np
import pytest

from triattn_local.sampling import Sampler, SamplingParams, nucleus, sample_on_device, sample_on_mlx

torch = pytest.importorskip("torch")
try:
    import mlx.core as mx
except ImportError:
    mx = None
needs_mlx = pytest.mark.skipif(mx is None, reason="mlx is not installed")


def full_sort_nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """The former sampler's rule: a stable sort of the whole vocabulary, the shortest prefix reaching top_p."""
    order = np.argsort(-p, kind="stable")
    cut = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
    return np.sort(order[:cut])


def full_sort_probabilities(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    z = (logits - logits.max()) / temperature
    p = np.exp(z) / np.exp(z).sum()
    out = np.zeros_like(p)
    keep = full_sort_nucleus(p, top_p)
    out[keep] = p[keep] / p[keep].sum()
    return out


def distributions(seed: int):
    """Sharp and flat distributions, with exact ties, on small and large vocabularies."""
    rng = np.random.default_rng(seed)
    yield rng.normal(size=50) * 4
    yield rng.normal(size=5000) * 0.3  # flat: the nucleus needs thousands of tokens (k doubles many times)
    ties = np.zeros(300)
    ties[:40] = 2.0  # 40 equally likely tokens at the edge of the nucleus
    ties[100:110] = 3.0
    yield rng.permutation(ties)
    yield rng.standard_cauchy(size=20000)
    long_tail = rng.normal(size=100000) * 0.1
    long_tail[7] = 10.0  # one token 10 nats above a mass of tail tokens that holds most of the probability
    yield long_tail


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.95, 0.999])
def test_nucleus_keeps_what_a_full_sort_keeps(top_p):
    for logits in distributions(0):
        p = np.exp(logits - logits.max())
        p /= p.sum()
        np.testing.assert_array_equal(np.sort(nucleus(p, top_p)), full_sort_nucleus(p, top_p))


@pytest.mark.parametrize("top_p", [0.5, 0.95])
def test_device_form_keeps_what_a_full_sort_keeps(top_p):
    """The torch form (run here on CPU tensors) gives zero probability outside the host nucleus: sample many times."""
    for logits in distributions(1):
        p = np.exp(logits - logits.max())
        p /= p.sum()
        allowed = set(full_sort_nucleus(p, top_p).tolist())
        gen = torch.Generator().manual_seed(0)
        batch = torch.tensor(np.broadcast_to(logits, (400, logits.size)).copy())
        drawn = sample_on_device(batch, SamplingParams(temperature=1.0, top_p=top_p), gen).tolist()
        assert set(drawn) <= allowed


def chi_square_ok(counts: np.ndarray, probs: np.ndarray, draws: int) -> bool:
    """Pearson's chi-square against the expected counts, at the 0.1 % level (scipy-free: Wilson–Hilferty)."""
    expected = probs * draws
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token outside the nucleus was drawn"
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = keep.sum() - 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / np.sqrt(2 / (9 * dof))
    return z < 3.09


@pytest.mark.parametrize("where", ["host", "device"])
def test_same_distribution_as_the_full_sort_sampler(where):
    rng = np.random.default_rng(5)
    logits = rng.normal(size=200) * 2.5
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=3)
    want = full_sort_probabilities(logits, params.temperature, params.top_p)
    draws = 20000
    if where == "host":
        sampler = Sampler(params)
        tokens = [sampler(logits) for _ in range(draws)]
    else:
        gen = torch.Generator().manual_seed(3)
        batch = torch.tensor(np.broadcast_to(logits, (draws, logits.size)).copy())
        tokens = sample_on_device(batch, params, gen).tolist()
    counts = np.bincount(tokens, minlength=logits.size)
    assert chi_square_ok(counts, want, draws)


def test_greedy_is_the_argmax_everywhere_and_suppress_is_honoured():
    rng = np.random.default_rng(2)
    for _ in range(20):
        logits = rng.normal(size=1000).astype(np.float32)
        params = SamplingParams(temperature=0)
        assert Sampler(params)(logits) == int(np.argmax(logits))
        assert Sampler(params)(torch.tensor(logits)) == int(np.argmax(logits))
        best = int(np.argmax(logits))
        banned = SamplingParams(temperature=0, suppress=(best,))
        assert Sampler(banned)(logits) != best and Sampler(banned)(torch.tensor(logits)) != best


def test_seeded_sampling_repeats_on_both_paths():
    logits = np.random.default_rng(9).normal(size=500).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=11)
    for convert in (lambda x: x, torch.tensor):
        a, b = Sampler(params), Sampler(params)
        assert [a(convert(logits)) for _ in range(30)] == [b(convert(logits)) for _ in range(30)]


@needs_mlx
@pytest.mark.parametrize("top_p", [0.5, 0.95])
def test_mlx_form_keeps_what_a_full_sort_keeps(top_p):
    for logits in distributions(1):
        p = np.exp(logits - logits.max())
        p /= p.sum()
        allowed = set(full_sort_nucleus(p, top_p).tolist())
        batch = mx.array(np.broadcast_to(logits, (400, logits.size)).astype(np.float32))
        drawn = sample_on_mlx(batch, SamplingParams(temperature=1.0, top_p=top_p), mx.random.key(0)).tolist()
        assert set(drawn) <= allowed


@needs_mlx
@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_mlx_form_has_the_full_sort_samplers_distribution(top_p):
    rng = np.random.default_rng(5)
    logits = rng.normal(size=200) * 2.5
    params = SamplingParams(temperature=0.7, top_p=top_p, seed=3)
    want = full_sort_probabilities(logits, params.temperature, params.top_p)
    draws = 20000
    batch = mx.array(np.broadcast_to(logits, (draws, logits.size)).astype(np.float32))
    tokens = sample_on_mlx(batch, params, mx.random.key(3)).tolist()
    assert chi_square_ok(np.bincount(tokens, minlength=logits.size), want, draws)


@needs_mlx
def test_mlx_greedy_suppress_and_seeds():
    rng = np.random.default_rng(2)
    for _ in range(20):
        logits = rng.normal(size=1000).astype(np.float32)
        best = int(np.argmax(logits))
        assert Sampler(SamplingParams(temperature=0))(mx.array(logits)) == best
        assert Sampler(SamplingParams(temperature=0, suppress=(best,)))(mx.array(logits)) != best
        banned = Sampler(SamplingParams(temperature=1.0, top_p=0.95, suppress=(best,), seed=1))
        assert all(banned(mx.array(logits)) != best for _ in range(50))
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=11)
    a, b = Sampler(params), Sampler(params)
    logits = mx.array(rng.normal(size=500).astype(np.float32))
    assert [a(logits) for _ in range(30)] == [b(logits) for _ in range(30)]
    assert len({a(logits) for _ in range(30)}) > 1  # the key advances every draw


def test_drawing_for_many_sequences_gives_each_its_own_tokens_in_one_transfer():
    """A batched decode step draws every sequence's token in one pass per sampling setting and copies the ids at
    once: each sequence gets what its own sampler (its seed, temperature, top-p) gives it alone, greedy included."""
    import torch

    from triattn_local.sampling import draw_many

    rng = np.random.default_rng(7)
    logits = torch.tensor(rng.normal(size=(5, 3000)) * 3, dtype=torch.float32)
    params = [SamplingParams(max_tokens=9, temperature=0.7, top_p=0.9, seed=1),
              SamplingParams(max_tokens=9, temperature=0.0),
              SamplingParams(max_tokens=9, temperature=1.2, top_p=1.0, seed=2),
              SamplingParams(max_tokens=9, temperature=0.7, top_p=0.9, seed=3),
              SamplingParams(max_tokens=9, temperature=0.7, top_p=0.9, seed=1, suppress=(5,))]
    batched, alone = [Sampler(p) for p in params], [Sampler(p) for p in params]
    rows = []
    for step in range(30):
        ids = draw_many(batched, logits, range(5))
        assert ids == [s(logits[i]) for i, s in enumerate(alone)]
        assert ids[1] == int(logits[1].argmax())
        rows.append(ids)
    first, fourth = [r[0] for r in rows], [r[3] for r in rows]
    assert first != fourth  # same logits and settings, seeds 1 and 3: each row draws with its own uniforms
    assert draw_many([Sampler(params[0])], logits, [0]) == draw_many([Sampler(params[0])], logits, [0])
    assert draw_many([Sampler(params[0]), Sampler(params[0])], logits, [3, 0]) == [
        Sampler(params[0])(logits[3]), Sampler(params[0])(logits[0])]  # sampler i draws from its row
    host = draw_many([Sampler(p) for p in params], logits.numpy(), range(5))  # host logits: the host sampler, one by one
    assert host == [Sampler(p)(logits[i].numpy()) for i, p in enumerate(params)]
