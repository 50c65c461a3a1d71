"""Metrics against float64 numpy references: KL, summaries, perplexity, top-1 agreement, chunking."""

import math

import mixq  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from mixq.core import metrics


def _np_logp(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_kl(r, q):
    lr, lq = _np_logp(r), _np_logp(q)
    return (np.exp(lr) * (lr - lq)).sum(-1)


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(3, 7, 50)).astype(np.float32) * 3
    other = ref + rng.normal(size=ref.shape).astype(np.float32) * 0.5
    return ref, other


def test_log_probs_normalised(pair):
    lp = np.array(metrics.log_probs(mx.array(pair[0])))
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(lp, _np_logp(pair[0]), atol=1e-5)


def test_kl_identical_is_zero(pair):
    kl = metrics.kl_per_token(mx.array(pair[0]), mx.array(pair[0]))
    assert kl.shape == (3, 7) and kl.dtype == mx.float32
    assert float(mx.max(mx.abs(kl))) == 0.0


def test_kl_matches_numpy_and_is_positive(pair):
    ref, other = pair
    kl = np.array(metrics.kl_per_token(mx.array(ref), mx.array(other)))
    np.testing.assert_allclose(kl, _np_kl(ref, other), rtol=1e-4, atol=1e-6)
    assert (kl > 0).all()


def test_kl_known_example():
    # p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(4/3)
    ref = mx.array([[[0.0, 0.0]]])
    q = mx.array([[[math.log(3.0), 0.0]]])
    assert float(metrics.kl_per_token(ref, q)[0, 0]) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)


def test_kl_with_masked_vocab():
    ref = mx.array([[[0.0, 0.0, -float("inf")]]])
    assert float(metrics.kl_per_token(ref, mx.array([[[0.0, 0.0, 5.0]]]))[0, 0]) == \
        pytest.approx(-math.log(2 / (2 + math.exp(5))), rel=1e-5)
    assert float(metrics.kl_per_token(ref, ref)[0, 0]) == 0.0


@pytest.mark.parametrize("chunk", [50, 7 * 50, 2 * 7 * 50, 10**9])
def test_chunking_gives_same_numbers(pair, chunk):
    ref, other = (mx.array(a) for a in pair)
    full = np.array(metrics.kl_per_token(ref, other))
    np.testing.assert_allclose(np.array(metrics.kl_per_token(ref, other, chunk_elements=chunk)), full, rtol=1e-6)
    tok = mx.array(np.random.default_rng(1).integers(0, 50, size=(3, 7)))
    assert metrics.perplexity(other, tok, chunk_elements=chunk) == pytest.approx(metrics.perplexity(other, tok),
                                                                                 rel=1e-6)


def test_bf16_inputs_computed_in_float32(pair):
    ref = mx.array(pair[0]).astype(mx.bfloat16)
    kl = metrics.kl_per_token(ref, ref * 0.5)
    assert kl.dtype == mx.float32 and float(mx.min(kl)) >= 0


@pytest.fixture(params=["numpy", "mlx"])
def kl_path(request, monkeypatch):
    """KL's per-element work in numpy (the CPU's) and in mlx (a GPU's)."""
    monkeypatch.setattr(metrics, "numpy_on_cpu", lambda: request.param == "numpy")
    return request.param


def test_small_kl_keeps_its_digits(kl_path):
    # a KV cache at 8 bits moves the logits by ~1e-3: KL ~1e-7, where a difference of two float32
    # log-sum-exps (~1e-6 apart) is noise
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(2, 16, 4096)).astype(np.float32) * 3
    other = ref + rng.normal(size=ref.shape).astype(np.float32) * 1e-3
    kl = np.array(metrics.kl_per_token(mx.array(ref), mx.array(other)))
    exact = _np_kl(ref, other)
    assert exact.mean() < 1e-6
    np.testing.assert_allclose(kl, exact, rtol=1e-2, atol=1e-8)


def test_kl_far_apart_logits_stay_finite(kl_path):
    # the other model puts logits 200 above the reference's on one token: exp(-d) alone would overflow
    ref = np.zeros((1, 2, 8), np.float32)
    other = ref.copy()
    other[0, 0, 3] = 200.0
    kl = np.array(metrics.kl_per_token(mx.array(ref), mx.array(other)))
    np.testing.assert_allclose(kl, _np_kl(ref, other), rtol=1e-5)
    assert kl[0, 0] > 170 and kl[0, 1] == 0.0


def test_kl_masked_vocab_both_paths(kl_path):
    ref = np.array([[[0.0, 1.0, -np.inf, 2.0], [0.5, -np.inf, -np.inf, 0.0]]], np.float32)
    other = np.array([[[0.3, 1.0, 4.0, 1.0], [0.0, 3.0, -np.inf, 0.0]]], np.float32)
    lr, lq = _np_logp(ref)[0], _np_logp(other)[0]
    expected = (np.exp(lr) * (np.where(np.isfinite(lr), lr, 0.0) - np.where(np.isfinite(lr), lq, 0.0))).sum(-1)
    kl = np.array(metrics.kl_per_token(mx.array(ref), mx.array(other)))[0]
    np.testing.assert_allclose(kl, expected, rtol=1e-5)


def test_kl_with_the_references_lse_given(pair, kl_path):
    ref, other = (mx.array(a) for a in pair)
    lse = metrics.logsumexp(ref)
    np.testing.assert_allclose(np.array(lse), np.log(np.exp(pair[0].astype(np.float64)).sum(-1)), rtol=1e-6)
    np.testing.assert_array_equal(np.array(metrics.kl_per_token(ref, other, ref_lse=lse)),
                                  np.array(metrics.kl_per_token(ref, other)))
    with pytest.raises(ValueError, match="ref_lse shape"):
        metrics.kl_per_token(ref, other, ref_lse=lse[:, :3])


def test_summarize_with_and_without_mask():
    v = np.arange(20, dtype=np.float32).reshape(2, 10)
    s = metrics.summarize(mx.array(v))
    assert s["mean"] == pytest.approx(9.5) and s["max"] == 19.0 and s["n"] == 20
    assert s["p50"] == pytest.approx(np.percentile(v, 50)) and s["p99"] == pytest.approx(np.percentile(v, 99))
    mask = v < 5
    s = metrics.summarize(mx.array(v), mx.array(mask))
    assert s == {"mean": 2.0, "p50": 2.0, "p99": pytest.approx(np.percentile(np.arange(5), 99)), "max": 4.0, "n": 5}
    with pytest.raises(ValueError):
        metrics.summarize(mx.array(v), mx.array(np.zeros_like(mask)))


def test_perplexity_uniform_is_vocab_size():
    tok = mx.array(np.random.default_rng(0).integers(0, 64, size=(2, 9)))
    assert metrics.perplexity(mx.zeros((2, 9, 64)), tok) == pytest.approx(64.0, rel=1e-5)
    assert metrics.perplexity(mx.zeros((2, 9, 64)), tok, shifted=True) == pytest.approx(64.0, rel=1e-5)


def test_perplexity_next_token_convention(pair):
    _, other = pair
    tok = np.random.default_rng(2).integers(0, 50, size=(3, 7))
    lp = _np_logp(other)
    nll = -np.take_along_axis(lp[:, :-1], tok[:, 1:, None], -1)[..., 0]
    assert metrics.perplexity(mx.array(other), mx.array(tok)) == pytest.approx(math.exp(nll.mean()), rel=1e-5)
    # shifted=True: logits[:, t] against targets[:, t]; same number for pre-shifted inputs
    assert metrics.perplexity(mx.array(other[:, :-1]), mx.array(tok[:, 1:]), shifted=True) == \
        pytest.approx(math.exp(nll.mean()), rel=1e-5)
    # mask marks valid token positions: a target counts when its own position is valid
    mask = np.ones((3, 7), bool)
    mask[:, 5:] = False
    want = math.exp(nll[:, :4].mean())
    assert metrics.perplexity(mx.array(other), mx.array(tok), mx.array(mask)) == pytest.approx(want, rel=1e-5)


def test_top1_agreement():
    ref = np.zeros((1, 4, 3), np.float32)
    q = np.zeros((1, 4, 3), np.float32)
    ref[0, :, 0] = 1
    q[0, :2, 0] = 1
    q[0, 2:, 2] = 1
    assert metrics.top1_agreement(mx.array(ref), mx.array(q)) == 0.5
    assert metrics.top1_agreement(mx.array(ref), mx.array(q), mx.array([[1, 1, 0, 0]])) == 1.0


def test_compare(pair):
    ref, other = (mx.array(a) for a in pair)
    tok = mx.array(np.random.default_rng(3).integers(0, 50, size=(3, 7)))
    same = metrics.compare(ref, ref, tok)
    assert set(same) == {"kl_mean", "kl_p99", "kl_max", "top1", "ppl", "ref_ppl"}
    assert same["kl_mean"] == same["kl_max"] == 0.0 and same["top1"] == 1.0 and same["ppl"] == same["ref_ppl"]
    c = metrics.compare(ref, other, tok)
    assert 0 < c["kl_mean"] <= c["kl_p99"] <= c["kl_max"] and 0 <= c["top1"] <= 1
    assert c["ppl"] == pytest.approx(metrics.perplexity(other, tok)) and c["ref_ppl"] != c["ppl"]


def test_shape_errors():
    with pytest.raises(ValueError):
        metrics.kl_per_token(mx.zeros((2, 3, 4)), mx.zeros((2, 3, 5)))
    with pytest.raises(ValueError):
        metrics.kl_per_token(mx.zeros((3, 4)), mx.zeros((3, 4)))
    with pytest.raises(ValueError):
        metrics.perplexity(mx.zeros((2, 3, 4)), mx.zeros((2, 4), dtype=mx.int32))
