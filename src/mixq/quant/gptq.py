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

Everything runs in mlx float32 on the default device, except the Cholesky factorisation and triangular
inverse, which mlx only has on the CPU stream. Rows are independent given H, so a weight is solved a few
rows (or a few experts, batched) at a time: the float32 working set of one step stays within about
WORKSET_BYTES whatever the tensor's size (lm_head 131072 x 4480 included); on top of it a tensor holds
its H and factors (one per expert for switch layers) and its packed result.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from mixq.core.formats import Format, applicable, dequantize, quantize_dequantize

GPTQ_VERSION = "gptq-v3"
DAMP = 0.01   # fraction of mean(diag H) added to the diagonal: keeps H invertible, standard in GPTQ
BLOCK = 32    # columns per lazy-update block (every group size is a multiple: a group spanning blocks starts at one)
WORKSET_BYTES = 256 << 20  # float32 bytes of one step: its rows' arrays (and its experts' stacked factors)
LIVE_COPIES = 4            # float32 arrays of a step's size the solve holds at once (measured)
CHECK_COPIES = 10          # the same for the check against round-to-nearest (run on a few rows at a time)
CACHE_ENTRIES = 1 << 20    # packed results `Rounding` keeps (keep=True) ...
CACHE_BYTES = 1 << 30      # ... and their bytes in all; see `Rounding`


def pack(q, bits: int):
    """Integers in [0, 2**bits) along the last axis (mx or numpy) -> mx uint32 words, mlx's
    little-endian bit order."""
    import mlx.core as mx

    q = q if isinstance(q, mx.array) else mx.array(np.asarray(q))
    lead, n = q.shape[:-1], q.shape[-1]
    if (n * bits) % 32:
        raise ValueError(f"{n} values of {bits} bits do not fill whole uint32 words")
    per = 32 // math.gcd(32, bits)          # values per repeating unit of whole words
    q = q.reshape(-1, n // per, per)
    words: list = [None] * (per * bits // 32)

    def put(w, v):
        words[w] = v if words[w] is None else words[w] | v

    for j in range(per):
        w, off = divmod(j * bits, 32)
        v = q[..., j].astype(mx.uint32)
        put(w, v << mx.array(off, dtype=mx.uint32))   # uint32 shifts drop the bits past 32
        spill = off + bits - 32
        if spill > 0:  # the value straddles two words
            put(w + 1, v >> mx.array(bits - spill, dtype=mx.uint32))
    return mx.stack(words, axis=-1).reshape(*lead, n * bits // 32)


def _f32(a):
    """mx float32 view of an mx or numpy array (numpy is converted without a float64 detour)."""
    import mlx.core as mx

    if isinstance(a, mx.array):
        return a.astype(mx.float32)
    return mx.array(np.asarray(a, dtype=np.float32))


def _inverse_cholesky(H):
    """Upper U with U^T U = (H + damping)^-1, float32; an all-zero H (no data) means plain rounding.

    With J the reversal, chol(J H J) = L gives H = (J L J)(J L J)^T, so U = J L^-1 J: one Cholesky and
    one triangular inverse, no explicit inverse of H (mlx's linalg runs on the CPU stream only). Besides
    H, at most two cols x cols float32 arrays are held at a time."""
    import mlx.core as mx

    H = _f32(H)[::-1, ::-1]   # J H J (a view): the damping below is the same in either order
    cols = H.shape[-1]
    diag = mx.diagonal(H)
    live = diag > 0
    if not mx.any(live).item():
        return mx.eye(cols, dtype=mx.float32)
    dead = not mx.all(live).item()   # dead columns: no coupling, 1 on the diagonal
    shift = mx.where(live, 0.0, 1.0) + DAMP * (mx.where(live, diag, 0.0).sum() / live.sum())
    mean = (mx.where(live, diag, 0.0) + shift).mean()
    idx = mx.arange(cols)
    for extra in (0.0, 0.1, 1.0, 10.0):  # more damping only if H is numerically indefinite
        Hd = mx.where(live[:, None] & live[None, :], H, 0.0) if dead else H
        L = mx.linalg.cholesky(Hd.at[idx, idx].add(shift + extra * mean), stream=mx.cpu)
        # mlx does not raise on a failed factorisation: the failing pivot is left <= 0 or NaN
        ok = mx.all(mx.diagonal(L) > 0)
        mx.eval(L, ok)
        del Hd
        if not ok.item():
            continue
        # the inverse of a lower factor is lower (mlx leaves exact zeros above); J L^-1 J is a view
        U = mx.linalg.tri_inv(L, upper=False, stream=mx.cpu)[::-1, ::-1]
        del L
        ok = mx.all(mx.isfinite(U))
        mx.eval(U, ok)
        if ok.item():
            return U
    return mx.eye(cols, dtype=mx.float32)


def _gptq(W, U, bits, group: int, dtype: str):
    """GPTQ a stack of (rows, cols) slices: W (E, rows, cols) float32, U (E or 1, cols, cols) their factors.
    `bits` is one number or one per slice (formats of one group size solved together: their copies of the
    weight stacked, each rounded to its own number of levels). Returns q (E, rows, cols) uint8 and scales,
    biases (E, rows, cols // group) float32 holding `dtype` values, w ~ scale * q + bias per group."""
    import mlx.core as mx

    cols = W.shape[-1]
    src = getattr(mx, dtype)
    if isinstance(bits, (list, tuple)):
        maxq = mx.array([[float(2 ** b - 1)] for b in bits])   # (E, 1): one per slice
    else:
        maxq = float(2 ** bits - 1)
    tiny = float(np.finfo(np.float16).tiny) if dtype == "float16" else 1e-30
    d = mx.diagonal(U, axis1=-2, axis2=-1)[:, None, :]     # (E|1, 1, cols)
    qs, S, B = [], [], []
    rest = W                                                # columns not yet rounded, updated lazily
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        W1, Ub = rest[..., :i2 - i1], U[..., i1:i2, i1:i2]
        errs, qcols = [], []
        for i in range(i2 - i1):
            c = i1 + i
            if c % group == 0:   # scale and bias from the group's columns as updated so far
                # a group wider than the lazy block starts at a block start, where `rest` is up to date
                block = W1[..., i:i + group] if i + group <= i2 - i1 else rest[..., :group]
                lo, hi = block.min(axis=-1), block.max(axis=-1)
                span = hi - lo
                sc = mx.where(span > 0, span / maxq, 1.0).astype(src).astype(mx.float32)
                s, b = mx.where(sc > 0, sc, tiny), lo.astype(src).astype(mx.float32)
                S.append(s), B.append(b)
            w = W1[..., i]
            q = mx.clip(mx.round((w - b) / s), 0.0, maxq)
            err = (w - (s * q + b)) / d[..., c]
            # U is upper triangular: the whole-block row leaves the columns already rounded untouched
            W1 = W1 - err[..., None] * Ub[..., i:i + 1, :]
            errs.append(err), qcols.append(q.astype(mx.uint8))
        qs.append(mx.stack(qcols, axis=-1))
        if i2 < cols:
            rest = mx.addmm(rest[..., i2 - i1:], mx.stack(errs, axis=-1), U[..., i1:i2, i2:], alpha=-1.0)
        mx.eval(rest, qs[-1], S[-1], B[-1])
    return mx.concatenate(qs, axis=-1), mx.stack(S, axis=-1), mx.stack(B, axis=-1)


def gptq_2d(W, H, bits: int, group: int, dtype: str, U=None):
    """GPTQ one (rows, cols) matrix -> numpy (q uint8, scales, biases), scales/biases float32 holding
    `dtype` values. `U` (upper Cholesky factor of the damped inverse of H) may be passed instead of H.
    For inspection and tests: `Rounding` solves large tensors in bounded row chunks."""
    import mlx.core as mx

    U = _inverse_cholesky(H) if U is None else _f32(U)
    q, S, B = _gptq(_f32(W)[None], U[None], bits, group, dtype)
    mx.eval(q, S, B)
    return np.array(q[0]), np.array(S[0]), np.array(B[0])


def _steps(slices: int, rows: int, cols: int, own_factors: bool, copies: int = 1) -> Iterator[tuple[int, int, int, int]]:
    """(e0, e1, r0, r1) steps covering slices x rows, each within WORKSET_BYTES (at least 32 rows): whole
    slices, as many as fit, or row chunks of one slice. `copies`: formats solved together (a copy each)."""
    row_bytes = LIVE_COPIES * cols * 4 * copies
    u = cols * cols * 4 if own_factors else 0   # a slice's own factor, stacked for the step
    fit = WORKSET_BYTES // (rows * row_bytes + u)
    if fit >= 1:
        for e0 in range(0, slices, fit):
            yield e0, min(e0 + fit, slices), 0, rows
        return
    step = max(32, (WORKSET_BYTES - u) // row_bytes)
    for e in range(slices):
        for r0 in range(0, rows, step):
            yield e, e + 1, r0, min(r0 + step, rows)


def _excess_error(Wsrc, g, r, H, kw: dict) -> np.ndarray:
    """Per slice of Wsrc (E, rows, cols): the output error sum d H d^T (d = W - dequantized, summed over
    rows) of the packed arrays `g` minus that of `r`. Equal to sum (deq_r - deq_g) H (2W - deq_g - deq_r)^T,
    so one product with H instead of two. `H` is one (cols, cols) for all slices or a list, one per slice;
    taken a few rows of one slice (or of all, with one H) at a time, holding ~CHECK_COPIES arrays."""
    import mlx.core as mx

    E, rows, cols = Wsrc.shape
    groups = [(0, E, _f32(H)[None])] if not isinstance(H, list) else [(e, e + 1, None) for e in range(E)]
    total = np.zeros(E)
    for e0, e1, He in groups:
        He = He if He is not None else _f32(H[e0])[None]
        sub = max(1, WORKSET_BYTES // (CHECK_COPIES * (e1 - e0) * cols * 4))
        for s0 in range(0, rows, sub):
            at = (slice(e0, e1), slice(s0, s0 + sub))
            dg, dr = (mx.dequantize(*(a[at] for a in x), dtype=mx.float32, **kw) for x in (g, r))
            diff = (((dr - dg) @ He) * (2 * Wsrc[at].astype(mx.float32) - dg - dr)).sum(axis=(1, 2))
            total[e0:e1] += np.array(diff, dtype=np.float64)
    return total


class Rounding:
    """Per tensor: GPTQ for affine formats where a Hessian was collected, mlx's round-to-nearest otherwise.

    `quantized` returns the packed (weight, scales, biases) mlx arrays that the written model holds;
    `qdq` returns their float32 dequantization (the fake quant every measurement uses). Hessians are
    numpy or mx arrays, (cols, cols) or one per expert (experts, cols, cols).

    Results asked for with `keep=True` are cached, packed, while the cache has room: at most
    CACHE_ENTRIES results and CACHE_BYTES in all, first come first kept, nothing evicted. A plan that is
    evaluated again and then written in the same tensor order (calibration, held-out, write) finds its
    first tensors solved, where least-recently-used would find none once the plan outgrows the cache;
    evaluating further plans adds nothing.
    """

    def __init__(self, hessians=None, settings: dict | None = None):
        # a dict, or mixq.quant.hessian.Hessians (computed lazily per block): path -> H
        self.hessians = hessians if hessians is not None else {}
        self._settings = dict(settings or {})
        self._cache: dict[tuple[str, str], tuple] = {}
        self._cache_bytes = 0
        self._fell_back: dict[tuple[str, str], bool] = {}  # every slice kept round-to-nearest
        self._factors: tuple[str | None, list] = (None, [])  # last path's float32 factors, one per slice

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
        return self.quantized_many(path, w, [fmt], keep=keep)[str(fmt)]

    def quantized_many(self, path: str, w, fmts: list, keep: bool = True) -> dict:
        """`quantized` for several affine formats of one tensor: formats of the same group size are solved
        together, one pass over the columns for all (same results as one by one)."""
        out, todo = {}, []
        for fmt in fmts:
            key = (path, str(fmt))
            if key in self._cache:
                out[str(fmt)] = self._cache[key]
            elif not self.uses_gptq(path, fmt) or not applicable(w.shape, fmt):
                raise ValueError(f"{path}: no GPTQ rounding for {fmt}")
            elif fmt not in todo:
                todo.append(fmt)
        for group in sorted({f.group_size for f in todo}):
            same = [f for f in todo if f.group_size == group]
            for fmt, (res, take_rtn) in zip(same, self._solve(path, w, same)):
                key = (path, str(fmt))
                self._fell_back[key] = bool(all(take_rtn))
                nbytes = sum(a.nbytes for a in res)
                if keep and len(self._cache) < CACHE_ENTRIES and self._cache_bytes + nbytes <= CACHE_BYTES:
                    self._cache[key] = res
                    self._cache_bytes += nbytes
                out[str(fmt)] = res
        return out

    def _slice_factors(self, path: str, H, slices: int) -> list:
        """One factor per slice (or one shared by all), kept for the last path: every candidate format
        of a tensor shares them."""
        if self._factors[0] != path:
            self._factors = (None, [])
            Hs = [H[e] for e in range(slices)] if H.ndim >= 3 else [H]
            self._factors = (path, [_inverse_cholesky(h) for h in Hs])
        return self._factors[1]

    def _solve(self, path: str, w, fmts: list):
        """Per format (all of one group size): packed GPTQ arrays for `w` and, per 2-D slice, whether
        round-to-nearest was kept instead."""
        import mlx.core as mx

        *lead, rows, cols = w.shape
        W3 = w.reshape(-1, rows, cols)   # switch experts (E, out, in) get one Hessian each
        slices = W3.shape[0]
        H = self.hessians[path]
        if H.ndim >= 3:
            H = H.reshape(-1, cols, cols)
            if H.shape[0] != slices:
                raise ValueError(f"{path}: {H.shape[0]} Hessians for {slices} slices")
        Us = self._slice_factors(path, H, slices)
        Hs = _f32(H) if H.ndim == 2 else None   # one shared H, converted once
        dtype = str(w.dtype).rsplit(".", 1)[-1]
        F = len(fmts)
        kws = [dict(group_size=f.group_size, bits=f.bits, mode="affine") for f in fmts]
        worse = np.zeros((F, slices))   # per format and slice: GPTQ's output error minus round-to-nearest's
        parts = []                      # per step: (e0, e1, r0, r1, per format GPTQ's packed arrays)
        for e0, e1, r0, r1 in _steps(slices, rows, cols, len(Us) > 1, copies=F):
            Wsrc = W3[e0:e1, r0:r1]
            n = e1 - e0
            Uc = Us[0][None] if len(Us) == 1 else mx.concatenate([mx.stack(Us[e0:e1])] * F)
            Wf = Wsrc.astype(mx.float32)
            q, S, B = _gptq(mx.concatenate([Wf] * F) if F > 1 else Wf, Uc,
                            [f.bits for f in fmts for _ in range(n)] if F > 1 else fmts[0].bits,
                            fmts[0].group_size, dtype)
            gs = []
            for k, fmt in enumerate(fmts):
                sl = slice(k * n, (k + 1) * n)
                g = (pack(q[sl], fmt.bits), S[sl].astype(w.dtype), B[sl].astype(w.dtype))
                r = tuple(mx.quantize(Wsrc, **kws[k]))
                mx.eval(*g, *r)
                Hh = Hs if Hs is not None else [H[e] for e in range(e0, e1)]
                worse[k, e0:e1] += _excess_error(Wsrc, g, r, Hh, kws[k])
                gs.append(g)
            del q, S, B, Uc
            parts.append((e0, e1, r0, r1, gs))
        # never worse than round-to-nearest on the output error GPTQ minimises (matters at 2 bits); its
        # arrays are not kept but quantized again, step by step, for the slices that take them
        results = []
        for k in range(F):
            take_rtn = worse[k] > 0
            pieces: list[list] = [[], [], []]
            for e0, e1, r0, r1, gs in parts:
                for e in range(e0, e1):
                    arrs = mx.quantize(W3[e, r0:r1], **kws[k]) if take_rtn[e] else [a[e - e0] for a in gs[k]]
                    for j in range(3):
                        pieces[j].append(arrs[j])
            out = tuple(mx.concatenate(p, axis=0).reshape(*lead, rows, -1) for p in pieces)
            mx.eval(*out)
            results.append((out, take_rtn))
        parts.clear()
        return results

    def qdq(self, path: str, w, fmt: Format, keep: bool = False):
        """Float32 value of `w` (source dtype) after rounding to `fmt` this way."""
        if not self.uses_gptq(path, fmt):
            return quantize_dequantize(w, fmt)
        wq, s, b = self.quantized(path, w, fmt, keep=keep)
        return dequantize(wq, s, b, fmt)


RTN = Rounding()
