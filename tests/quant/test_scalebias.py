"""Scales and biases as trainable parameters over fixed codes (`mixq.quant.scalebias`)."""

import mlx.core as mx
import numpy as np

from mixq.core.formats import Format
from mixq.quant.qweight import round_weight
from mixq.quant.scalebias import ScaleBias, codes_of


def _qs():
    w = mx.array(np.random.default_rng(0).normal(size=(8, 128)).astype(np.float32)).astype(mx.bfloat16)
    return {f"t{b}.weight": round_weight(None, f"t{b}.weight", w, Format.parse(f"{b}:64")) for b in (4, 8)}


def test_zero_parameters_give_the_written_weights_and_codes_stay():
    qs = _qs()
    sb = ScaleBias(qs, by_bits=True)
    got = dict(sb.weights(sb.zeros(), cast=True, dtype=mx.float32))
    for p, q in qs.items():
        ref = mx.dequantize(q.wq, q.scales.astype(mx.float32), q.biases.astype(mx.float32), dtype=mx.float32,
                            **q.fmt.quant_kwargs())
        assert mx.allclose(got[p], ref, rtol=1e-6, atol=1e-6).item()
        out = sb.quantized(sb.zeros())[p]
        assert out.wq is q.wq and mx.array_equal(codes_of(out), codes_of(q)).item()


def test_by_bits_the_scales_step_shrinks_with_the_width():
    """The same parameter moves an 8-bit tensor's scales 2^-4 as far as a 4-bit tensor's (a weight moves
    up to its group's range, 2^bits steps); the bias's parameter is in steps at every width; without
    by_bits both scales move alike."""
    qs = _qs()
    for by_bits, ratio in ((True, 1 / 16), (False, 1.0)):
        sb = ScaleBias(qs, by_bits=by_bits)
        params = {p: {"a": mx.full(d["a"].shape, 0.01), "c": mx.full(d["c"].shape, 0.5)} for p, d in sb.zeros().items()}
        vals = sb.values(params, cast=False)
        s0 = {p: q.scales.astype(mx.float32) for p, q in qs.items()}
        rel = {p: float((vals[p][0] / s0[p] - 1).mean().item()) for p in qs}
        assert np.isclose(rel["t8.weight"] / rel["t4.weight"], ratio, rtol=1e-4)
        for p, q in qs.items():
            assert mx.allclose(vals[p][1] - q.biases.astype(mx.float32), 0.5 * s0[p], rtol=1e-5, atol=1e-7).item()


def test_gradient_is_the_plain_expressions():
    """The values' own backward (it recomputes the starts from the written bf16 arrays) gives the gradient
    autodiff gives for s0 (1 + k a), b0 + c s0 written out with float32 starts."""
    qs = _qs()
    sb = ScaleBias(qs, by_bits=True)
    rng = np.random.default_rng(1)
    params = {p: {k: mx.array(rng.normal(size=v.shape).astype(np.float32) * 0.01) for k, v in d.items()}
              for p, d in sb.zeros().items()}
    probe = {p: mx.array(rng.normal(size=(2, *q.scales.shape)).astype(np.float32)) for p, q in qs.items()}

    def loss(values):
        return sum((mx.square(s * probe[p][0]) + b * probe[p][1]).sum() for p, (s, b) in values.items())

    def plain(params):
        out = {}
        for p, q in qs.items():
            s0, b0 = q.scales.astype(mx.float32), q.biases.astype(mx.float32)
            out[p] = (s0 * (1.0 + 2.0 ** (4 - q.fmt.bits) * params[p]["a"]), b0 + params[p]["c"] * s0)
        return out

    got = mx.grad(lambda x: loss(sb.values(x, cast=False)))(params)
    want = mx.grad(lambda x: loss(plain(x)))(params)
    for p in qs:
        for k in ("a", "c"):
            assert mx.allclose(got[p][k], want[p][k], rtol=1e-6, atol=1e-9).item()
    assert any(float(mx.abs(got[p]["a"]).max().item()) > 0 for p in qs)
