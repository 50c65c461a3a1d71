"""mixq.core.fp4: mxfp4 / nvfp4 round-to-nearest in numpy, bit for bit mlx's CPU `mx.quantize`."""

import mlx.core as mx
import numpy as np
import pytest

from mixq.core import formats
from mixq.core.formats import Format
from mixq.core.fp4 import quantize_fp4


def _source(w: np.ndarray, dtype):
    W = mx.array(w.astype(np.float32)).astype(dtype)
    host = np.array(W.astype(mx.float32))
    return W, host.astype(np.float16) if dtype == mx.float16 else host


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_words_and_scales_equal_mlx(mode, dtype):
    rng = np.random.default_rng(0)
    for trial in range(24):
        scale = 10.0 ** rng.uniform(-7, 3)   # e4m3 / fp16 subnormal scales at the low end
        w = rng.standard_normal((32, 256)) * scale * np.exp(rng.standard_normal((32, 1)))
        if trial % 3 == 1:
            w[:, :48] = 0.0                   # all-zero groups
        if trial % 3 == 2:
            w = np.round(w / scale * 4) * scale / 4   # many exact ties between e2m1 values
        W, host = _source(w, dtype)
        words, scales = mx.quantize(W, mode=mode)
        got_w, got_s = quantize_fp4(host, mode)
        assert got_w.dtype == np.uint32 and got_s.dtype == np.uint8
        assert np.array_equal(got_w, np.array(words)) and np.array_equal(got_s, np.array(scales)), (trial, scale)


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4"])
def test_ties_and_signs_follow_mlx(mode):
    # every e2m1 value and every midpoint between two, both signs, in a group whose scale is 1
    g = 32 if mode == "mxfp4" else 16
    vals = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 5.5, 6.0, 7.0]
    rows = []
    for v in vals:
        for sign in (1.0, -1.0):
            r = np.zeros(g, np.float32)
            r[0], r[1] = 6.0, sign * v
            rows.append(r)
    w = np.stack(rows)
    words, scales = mx.quantize(mx.array(w), mode=mode)
    got_w, got_s = quantize_fp4(w, mode)
    assert np.array_equal(got_w, np.array(words)) and np.array_equal(got_s, np.array(scales))


def test_formats_quantize_takes_the_numpy_path_on_the_cpu(monkeypatch):
    # the convert's quantize (chunked rows, stacked experts) gives mlx's bytes through numpy on the CPU
    calls = []
    real = formats.quantize_fp4
    monkeypatch.setattr(formats, "quantize_fp4", lambda *a: calls.append(a[1]) or real(*a))
    monkeypatch.setattr(formats, "QUANTIZE_CHUNK", 5 * 64)
    w = mx.random.normal((2, 9, 64), key=mx.random.key(3)).astype(mx.bfloat16)
    for spec in ("mxfp4", "nvfp4"):
        fmt = Format.parse(spec)
        got = formats.quantize(w, fmt)
        want = mx.quantize(w, **fmt.quant_kwargs())
        assert got[2] is None
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype and mx.array_equal(a, b).item()
    assert set(calls) == {"mxfp4", "nvfp4"} and len(calls) > 2
