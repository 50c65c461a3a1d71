"""GPTQ rounding: mlx's exact packing, lower output error than round-to-nearest, Hessians from real layers."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mixq.core.anatomy import describe
from mixq.core.formats import AFFINE_BITS, AFFINE_GROUPS, Format, quantize_dequantize
from mixq.core.forward import BlockRunner
from mixq.core.modelio import load
from mixq.quant.gptq import Rounding, gptq_2d, pack
from mixq.core.errors import MixqError


@pytest.mark.parametrize("bits", AFFINE_BITS)
@pytest.mark.parametrize("group", AFFINE_GROUPS)
def test_pack_is_bit_identical_to_mlx(bits, group):
    # integer weights q - (2^bits - 1) with every group spanning the full range: mlx quantizes them with
    # scale 1 and bias -(2^bits - 1), so its packed words must be ours bit for bit
    rng = np.random.default_rng(bits * 1000 + group)
    q = rng.integers(0, 2 ** bits, size=(6, 256))
    q[:, ::group], q[:, 1::group] = 0, 2 ** bits - 1
    wq, s, b = mx.quantize(mx.array((q - (2 ** bits - 1)).astype(np.float32)), group_size=group, bits=bits)
    assert np.all(np.array(s) == 1) and np.all(np.array(b) == -(2 ** bits - 1))
    assert np.array_equal(pack(q, bits), np.array(wq))
    ones, zeros = mx.ones(s.shape), mx.zeros(b.shape)
    back = mx.dequantize(mx.array(pack(q, bits)), ones, zeros, group_size=group, bits=bits)
    assert np.array_equal(np.array(back), q.astype(np.float32))


def _problem(rows=48, cols=128, n=1024, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols)) * 0.05
    mix = rng.standard_normal((cols, cols)) * 0.3 + np.eye(cols)
    X = rng.standard_normal((n, cols)) @ mix * rng.uniform(0.1, 3.0, cols)  # correlated, uneven channels
    return W, X


def _deq(q, S, B, group):
    return np.repeat(S, group, 1) * q + np.repeat(B, group, 1)


@pytest.mark.parametrize("bits,group", [(3, 64), (4, 64), (4, 32), (6, 32), (8, 128)])
def test_gptq_beats_round_to_nearest_on_output_error(bits, group):
    W, X = _problem()
    q, S, B = gptq_2d(W, X.T @ X, bits, group, "bfloat16")
    assert q.min() >= 0 and q.max() <= 2 ** bits - 1
    # scales and biases are bf16 values, as they will be stored
    assert np.array_equal(S, np.array(mx.array(S.astype(np.float32)).astype(mx.bfloat16).astype(mx.float32)))
    rtn = np.array(quantize_dequantize(mx.array(W.astype(np.float32)).astype(mx.bfloat16),
                                       Format.affine(bits, group)), dtype=np.float64)
    err_gptq = np.linalg.norm(X @ (W - _deq(q, S, B, group)).T)
    err_rtn = np.linalg.norm(X @ (W - rtn).T)
    assert err_gptq < 0.8 * err_rtn


@pytest.mark.parametrize("bits", [2, 4])
def test_rounding_is_never_worse_than_round_to_nearest(bits):
    W, X = _problem(seed=3)
    H = X.T @ X
    w = mx.array(W.astype(np.float32)).astype(mx.bfloat16)
    fmt = Format.affine(bits, 128)
    ours = np.array(Rounding({"w": H}).qdq("w", w, fmt), dtype=np.float64)
    rtn = np.array(quantize_dequantize(w, fmt), dtype=np.float64)
    Wb = np.array(w.astype(mx.float32), dtype=np.float64)
    err = lambda Q: np.einsum("ij,jk,ik->", Wb - Q, H, Wb - Q)  # noqa: E731
    assert err(ours) <= err(rtn) * (1 + 1e-9)


def test_gptq_with_no_data_is_plain_rounding():
    W, _ = _problem(cols=64)
    q, S, B = gptq_2d(W, np.zeros((64, 64)), 4, 64, "float32")
    lo, hi = W.min(1), W.max(1)
    assert np.abs(_deq(q, S, B, 64) - W).max() <= ((hi - lo) / 15).max() / 2 + 1e-6


def test_rounding_arrays_match_mlx_layers_and_switch_experts():
    rng = np.random.default_rng(1)
    W3 = mx.array(rng.standard_normal((3, 32, 128)).astype(np.float32) * 0.05).astype(mx.bfloat16)
    H3 = np.stack([np.eye(128) * (e + 1) for e in range(3)])
    r = Rounding({"sw.weight": H3})
    fmt = Format.affine(4, 64)
    wq, s, b = r.quantized("sw.weight", W3, fmt)
    ref = mx.quantize(W3, group_size=64, bits=4)
    assert [a.shape for a in (wq, s, b)] == [a.shape for a in ref]
    assert wq.dtype == mx.uint32 and s.dtype == b.dtype == mx.bfloat16
    deq = r.qdq("sw.weight", W3, fmt)
    assert deq.dtype == mx.float32 and deq.shape == W3.shape
    assert mx.allclose(deq, mx.dequantize(wq, s, b, group_size=64, bits=4, dtype=mx.float32)).item()
    # microscaled formats and tensors without a Hessian fall back to mlx's own rounding
    for path, f in (("sw.weight", Format("mxfp4")), ("other.weight", fmt)):
        assert not r.uses_gptq(path, f)
        assert mx.array_equal(r.qdq(path, W3, f), quantize_dequantize(W3, f)).item()
    assert r.name_for("sw.weight", fmt) == "gptq" and r.name_for("sw.weight", Format("float")) == "float"


def _calibrated(path, tokens, paths_filter=None):
    """A Calibration whose Hessians are filled (head Gram, embedding Fisher) without measuring anything."""
    from mixq.core.formats import parse_candidates
    from mixq.quant.calibpass import Calibration, make_rounding

    lm = load(path, compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    rounding, H = make_rounding(a, "gptq")
    cal = Calibration(lm.runner(), a, tokens, parse_candidates("4:64,float"), rounding=rounding, hessians=H,
                      method="estimate", target_bpw=4.5, source_dtypes=lm.source_dtypes, batch_size=2)
    cal.prepare_rounding()
    return lm, a, rounding, H


def test_gptq_lowers_kl_of_the_output_layer(nemotron_dense):
    """What GPTQ is for: the same format, lower KL than round-to-nearest, on a real forward; and the head's
    H is exactly the Gram of the final normed hidden states."""
    tokens = mx.array(np.random.default_rng(0).integers(1, 200, size=(4, 32)).astype(np.int32))
    lm, a, rounding, H = _calibrated(nemotron_dense, tokens)
    f32 = load(nemotron_dense)
    r = BlockRunner(f32.model)
    h = r.embed(tokens)
    for i in range(r.num_blocks):
        h = r.block(i, h)
    X = r.norm(h).reshape(-1, h.shape[-1])
    assert mx.allclose(H["lm_head.weight"], X.T @ X, rtol=1e-4, atol=1e-3).item()
    ref = nn.log_softmax(f32.model(tokens), axis=-1)
    w = f32.model.lm_head.weight
    fmt = Format.affine(2, 64)

    def kl(wd):
        f32.model.lm_head.weight = wd
        lq = nn.log_softmax(f32.model(tokens), axis=-1)
        f32.model.lm_head.weight = w
        return (mx.exp(ref) * (ref - lq)).sum(-1).mean().item()

    src = w.astype(mx.bfloat16)
    assert kl(rounding.qdq("lm_head.weight", src, fmt)) < 0.9 * kl(quantize_dequantize(src, fmt))


def test_tied_embedding_gets_both_roles(qwen3):
    """A tied embedding is both a lookup table and the output layer: its H carries both second moments."""
    tokens = mx.array(np.random.default_rng(0).integers(1, 200, size=(2, 16)).astype(np.int32))
    lm, a, rounding, H = _calibrated(qwen3, tokens)
    assert lm.runner().tied
    emb = "model.embed_tokens.weight"
    assert emb in H and tuple(H[emb].shape) == (a.tensor(emb).shape[1],) * 2
    assert mx.trace(H[emb]).item() == pytest.approx(2.0, rel=1e-4)  # two trace-normalised parts
    assert rounding.uses_gptq(emb, Format.affine(4, 64))
    # block tensors have their H only while a sweep is at their block: asking elsewhere is an error
    block = next(p for p in H if p.startswith("model.layers.0."))
    with pytest.raises(MixqError, match="block the sweep is not at"):
        H[block]
