"""mlx's CPU round-to-nearest for the 4-bit float formats (mxfp4, nvfp4), in numpy.

mlx's CPU `quantize` for them costs ~120 ns per element here (~20x its affine path: per-element
transcendentals), which made them the largest part of the round-to-nearest estimates. This returns the
same packed words and scale bytes (tests compare them bit for bit with `mx.quantize`, ties included):
- scale per group: mxfp4 2^ceil(log2(amax / 6)) as an e8m0 byte; nvfp4 amax / 6 rounded to nearest
  e4m3 (subnormals included, at most 448), a zero scale giving zero elements;
- elements x / scale to the nearest e2m1 value {0, .5, 1, 1.5, 2, 3, 4, 6}, a tie to the smaller
  magnitude, the sign bit set only on a nonzero magnitude; eight 4-bit codes per uint32, low nibble first.
"""

from __future__ import annotations

import numpy as np

GROUPS = {"mxfp4": 32, "nvfp4": 16}
_MIDPOINTS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=np.float32)
_E4M3_MAX = 448.0


def quantize_fp4(w: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) float -> (words uint32 (rows, cols / 8), scales uint8 (rows, cols / group)). Pass `w`
    in its source dtype: for float16, mlx takes mxfp4's amax / 6 in float16 (it differs where that is
    subnormal)."""
    g = GROUPS[mode]
    rows, cols = w.shape
    amax = np.abs(w).reshape(rows, cols // g, g).max(axis=-1)
    if mode == "mxfp4" and w.dtype == np.float16:
        target = (amax / np.float16(6.0)).astype(np.float32)
    else:
        target = amax.astype(np.float32) / np.float32(6.0)
    x = np.asarray(w, dtype=np.float32).reshape(rows, cols // g, g)
    if mode == "mxfp4":
        scale, code = _e8m0(target)
    else:
        scale, code = _e4m3(target)
    safe = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    y = x / safe[..., None]
    ay = np.abs(y)
    mag = np.zeros(ay.shape, dtype=np.uint8)   # midpoints strictly below |y|: a tie takes the lower value
    for m in _MIDPOINTS:   # seven compares: ~6x faster than searchsorted's binary search per element
        mag += ay > m
    mag = mag.astype(np.uint32)
    mag[scale <= 0] = 0
    codes = mag | (((y < 0) & (mag > 0)).astype(np.uint32) << 3)
    codes = codes.reshape(rows, cols // 8, 8) << (4 * np.arange(8, dtype=np.uint32))
    return np.bitwise_or.reduce(codes, axis=-1).astype(np.uint32), code


def _e8m0(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2^ceil(log2 t) and its biased exponent byte (t = 0 gives exponent 0, as mlx does)."""
    m, e = np.frexp(t.astype(np.float64))          # t = m 2^e, m in [0.5, 1)
    k = np.where(m == 0.5, e - 1, e)
    k = np.where(t > 0, k, 0)
    k = np.clip(k, -127, 127)
    return np.ldexp(1.0, k).astype(np.float32), (k + 127).astype(np.uint8)


def _e4m3(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """t rounded to nearest e4m3 (ties to even, subnormal step 2^-9, at most 448) and its byte."""
    t64 = t.astype(np.float64)
    _, e = np.frexp(np.maximum(t64, 1e-300))
    k = np.maximum(e - 1, -6)                       # floor(log2 t), no lower than the smallest normal
    step = np.ldexp(1.0, k - 3)
    v = np.minimum(np.rint(t64 / step) * step, _E4M3_MAX)
    _, e2 = np.frexp(np.maximum(v, 1e-300))
    k2 = e2 - 1
    normal = v >= 2.0 ** -6
    exp_field = np.where(normal, k2 + 7, 0)
    mant = np.where(normal, (v / np.ldexp(1.0, k2) - 1.0) * 8.0, v / 2.0 ** -9)
    byte = (exp_field << 3) | np.rint(mant).astype(np.int64)
    return v.astype(np.float32), np.where(v > 0, byte, 0).astype(np.uint8)
