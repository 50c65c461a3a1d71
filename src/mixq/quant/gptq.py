"""Error-compensating rounding (GPTQ) for affine formats, packed exactly as mlx stores them.

Round-to-nearest (what `mx.quantize` does) rounds every weight on its own. GPTQ (Frantar et al., 2022)
rounds one input column at a time and pushes each column's rounding error onto the columns not yet
rounded, weighted by the inverse of H, the second moment of what the weight multiplies: for a Linear,
H = sum of x x^T over calibration inputs, so the layer's *output* error is what is minimised, not the
weight error. The same holds for an embedding if H is the Fisher of the embedding output (see
`mixq.quant.hessian`). On the demo model this cuts lm_head's KL at 4:64 to about a third.

The result is ordinary mlx affine data (w = scale * q + bias per group, q packed little-endian into
uint32 words, scales and biases in the source dtype), so stock `mlx_lm.load` reads it and the quantized
kernels compute exactly what the fake quant here measured. Microscaled formats (mxfp4, nvfp4, mxfp8) and
tensors without a Hessian keep mlx's round-to-nearest.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mixq.core.formats import Format, applicable, quantize_dequantize

GPTQ_VERSION = "gptq-v2"
DAMP = 0.01   # fraction of mean(diag H) added to the diagonal: keeps H invertible, standard in GPTQ
BLOCK = 128   # columns per lazy-update block (a multiple of every group size)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Integers in [0, 2**bits) along the last axis -> uint32 words, mlx's little-endian bit order."""
    q = np.asarray(q, dtype=np.uint64)
    lead, n = q.shape[:-1], q.shape[-1]
    if (n * bits) % 32:
        raise ValueError(f"{n} values of {bits} bits do not fill whole uint32 words")
    per = 32 // np.gcd(32, bits)          # values per repeating unit of whole words
    words = per * bits // 32
    q = q.reshape(-1, n // per, per)
    out = np.zeros((q.shape[0], n // per, words), dtype=np.uint64)
    for j in range(per):
        pos = j * bits
        w, off = divmod(pos, 32)
        out[:, :, w] |= (q[:, :, j] << np.uint64(off)) & np.uint64(0xFFFFFFFF)
        spill = off + bits - 32
        if spill > 0:  # the value straddles two words
            out[:, :, w + 1] |= q[:, :, j] >> np.uint64(bits - spill)
    return out.reshape(*lead, n * bits // 32).astype(np.uint32)


def _round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Values as the source dtype stores them (scales and biases are saved in it)."""
    import mlx.core as mx

    return np.array(mx.array(x.astype(np.float32)).astype(getattr(mx, dtype)).astype(mx.float32),
                    dtype=np.float64)


def _inverse_cholesky(H: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of (H + damping)^-1; an all-zero H (no data) means plain rounding."""
    cols = H.shape[0]
    H = H.astype(np.float64).copy()
    diag = np.diag(H).copy()
    if not np.any(diag > 0):
        return np.eye(cols)
    dead = diag <= 0
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    H[dead, dead] = 1.0
    H[np.diag_indices(cols)] += DAMP * float(np.mean(diag[~dead]))
    for extra in (0.0, 0.1, 1.0, 10.0):  # more damping only if H is numerically indefinite
        try:
            Hd = H + extra * float(np.mean(np.diag(H))) * np.eye(cols)
            return np.linalg.cholesky(np.linalg.inv(Hd)).T
        except np.linalg.LinAlgError:
            continue
    return np.eye(cols)


def gptq_2d(W: np.ndarray, H: np.ndarray | None, bits: int, group: int, dtype: str, U: np.ndarray | None = None):
    """GPTQ one (rows, cols) matrix -> (q int, scales, biases) with scales/biases in `dtype` values.
    `U` (the upper Cholesky factor of the damped inverse of H) may be passed instead of H to reuse it."""
    W = np.array(W, dtype=np.float64, copy=True)
    rows, cols = W.shape
    U = _inverse_cholesky(H) if U is None else U
    maxq = float(2 ** bits - 1)
    tiny = float(np.finfo(np.float16).tiny) if dtype == "float16" else 1e-30
    q_all = np.zeros((rows, cols), dtype=np.int64)
    S = np.zeros((rows, cols // group))
    B = np.zeros_like(S)
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            g = c // group
            if c % group == 0:
                block = W1[:, i:i + group]
                lo, hi = block.min(axis=1), block.max(axis=1)
                span = hi - lo
                sc = _round_to(np.where(span > 0, span / maxq, 1.0), dtype)
                S[:, g] = np.where(sc > 0, sc, tiny)
                B[:, g] = _round_to(lo, dtype)
            w = W1[:, i]
            q = np.clip(np.rint((w - B[:, g]) / S[:, g]), 0.0, maxq)
            q_all[:, c] = q.astype(np.int64)
            err = (w - (S[:, g] * q + B[:, g])) / U[c, c]
            W1[:, i:] -= np.outer(err, U[c, c:i2])
            E1[:, i] = err
        if i2 < cols:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return q_all, S, B


class Rounding:
    """Per tensor: GPTQ for affine formats where a Hessian was collected, mlx's round-to-nearest otherwise.

    `quantized` returns the packed (weight, scales, biases) mlx arrays that the written model holds;
    `qdq` returns their float32 dequantization (the fake quant every measurement uses). Results asked for
    with `keep=True` are cached, packed, so evaluating and then writing a plan solves each tensor once.
    """

    def __init__(self, hessians=None, settings: dict | None = None):
        # a dict, or mixq.quant.hessian.Hessians (computed lazily per block): path -> H
        self.hessians = hessians if hessians is not None else {}
        self._settings = dict(settings or {})
        self._cache: dict[tuple[str, str], tuple] = {}
        self._fell_back: dict[tuple[str, str], bool] = {}  # every slice kept round-to-nearest
        self._factors: tuple[str | None, list] = (None, [])  # last path's Cholesky factors, one per slice

    def settings(self) -> dict:
        """Everything that changes the rounded values (goes into the sensitivity key)."""
        if not self.hessians:
            return {"method": "rtn"}
        return {"method": GPTQ_VERSION, "damp": DAMP, "block": BLOCK, **self._settings}

    def uses_gptq(self, path: str, fmt: Format) -> bool:
        return fmt.mode == "affine" and path in self.hessians

    def name_for(self, path: str, fmt: Format) -> str:
        """How the tensor is rounded: "gptq", "rtn" (no Hessian, a microscaled format, or GPTQ measured
        worse than round-to-nearest, known once the tensor has been rounded), or "float"."""
        if not fmt.is_quantized:
            return "float"
        if not self.uses_gptq(path, fmt) or self._fell_back.get((path, str(fmt))):
            return "rtn"
        return "gptq"

    def quantized(self, path: str, w, fmt: Format, keep: bool = True) -> tuple[Any, Any, Any]:
        """GPTQ-rounded (packed uint32 weight, scales, biases) for `w` given in its source dtype."""
        import mlx.core as mx

        key = (path, str(fmt))
        if key in self._cache:
            return self._cache[key]
        if not self.uses_gptq(path, fmt) or not applicable(w.shape, fmt):
            raise ValueError(f"{path}: no GPTQ rounding for {fmt}")
        dtype = str(w.dtype).rsplit(".", 1)[-1]
        Wn = np.array(w.astype(mx.float32), dtype=np.float64)
        lead = Wn.shape[:-2]
        Wf = Wn.reshape(-1, *Wn.shape[-2:])   # switch experts (E, out, in) get one Hessian each
        H = self.hessians[path]
        if hasattr(H, "chunk"):  # per-expert Grams formed on demand
            H = H.chunk(0, len(H))
        H = np.array(H.astype(mx.float32)) if isinstance(H, mx.array) else H
        Hf = H.reshape(-1, *H.shape[-2:]) if H.ndim == 3 else H[None]
        if self._factors[0] != path:  # every candidate format of a tensor shares them: factor once
            self._factors = (None, [])
            self._factors = (path, [_inverse_cholesky(Hf[min(e, len(Hf) - 1)]) for e in range(Wf.shape[0])])
        Us = self._factors[1]
        rtn = mx.quantize(w, group_size=fmt.group_size, bits=fmt.bits, mode="affine")
        rtn_deq = np.array(mx.dequantize(*rtn, group_size=fmt.group_size, bits=fmt.bits, mode="affine",
                                         dtype=mx.float32), dtype=np.float64).reshape(Wf.shape)
        qs, ss, bs, take_rtn = [], [], [], []
        for e in range(Wf.shape[0]):
            He = np.asarray(Hf[min(e, len(Hf) - 1)], dtype=np.float64)
            q, sc, b = gptq_2d(Wf[e], None, fmt.bits, fmt.group_size, dtype, U=Us[e])
            D_g = Wf[e] - np.repeat(sc, fmt.group_size, 1) * q - np.repeat(b, fmt.group_size, 1)
            D_r = Wf[e] - rtn_deq[e]
            # never worse than round-to-nearest on the output error GPTQ minimises (matters at 2 bits)
            take_rtn.append(float(np.sum((D_g @ He) * D_g)) > float(np.sum((D_r @ He) * D_r)))
            qs.append(q), ss.append(sc), bs.append(b)
        shape = lambda a: a.reshape(*lead, *a.shape[-2:])  # noqa: E731
        out = [mx.array(shape(pack(np.stack(qs), fmt.bits))),
               mx.array(shape(np.stack(ss)).astype(np.float32)).astype(w.dtype),
               mx.array(shape(np.stack(bs)).astype(np.float32)).astype(w.dtype)]
        self._fell_back[key] = all(take_rtn)
        if any(take_rtn):
            pick = mx.array(np.array(take_rtn).reshape(*lead, 1, 1)) if lead else mx.array(take_rtn[0])
            out = [mx.where(pick, r.astype(o.dtype), o) for r, o in zip(rtn, out)]
        out = tuple(out)
        mx.eval(*out)
        if keep:
            self._cache[key] = out
        return out

    def qdq(self, path: str, w, fmt: Format, keep: bool = False):
        """Float32 value of `w` (source dtype) after rounding to `fmt` this way."""
        import mlx.core as mx

        if not self.uses_gptq(path, fmt):
            return quantize_dequantize(w, fmt)
        wq, s, b = self.quantized(path, w, fmt, keep=keep)
        return mx.dequantize(wq, s, b, group_size=fmt.group_size, bits=fmt.bits, mode="affine",
                             dtype=mx.float32)


RTN = Rounding()
