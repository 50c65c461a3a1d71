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
inverse, done in place by LAPACK on the CPU (mlx has them on the CPU stream only, and not in place).
Rows are independent given H, so a weight is solved a few rows (or a few experts, batched) at a time:
the float32 working set of one step stays within about WORKSET_BYTES whatever the tensor's size (lm_head
131072 x 4480 included); on top of it a tensor holds its H and factors (one per expert for switch layers,
in numpy, sent to the device 32 rows at a time) and its packed result. Which tensors are solved, and what
is kept between solves, is `mixq.quant.rounding.Rounding`'s.
"""

from __future__ import annotations

import functools
import math
from typing import Iterator

import numpy as np

from mixq.core.blas import numpy_on_cpu
from mixq.core.lanes import thread_map

GPTQ_VERSION = "gptq-v6"   # v6: a 256-row check sample; v5: outer blocks, the check on a row sample
DAMP = 0.01   # fraction of mean(diag H) added to the diagonal: keeps H invertible, standard in GPTQ
BLOCK = 32    # columns per lazy-update block (every group size is a multiple: a group spanning blocks starts at one)
OUTER = 256   # columns whose errors reach the later columns in one product (GPTQ's lazy batch update): depth-32
              # products were memory-bound, reading and writing every later column each 32 columns
WORKSET_BYTES = 256 << 20  # float32 bytes of one step: its rows' arrays (and its experts' stacked factors)
LIVE_COPIES = 4            # float32 arrays of a step's size the solve holds at once (measured)
CHECK_COPIES = 10          # the same for the check against round-to-nearest (run on a few rows at a time)
CHECK_ROWS = 256           # the check runs on every k-th row, k = rows // CHECK_ROWS (it was ~1/4 of a solve;
                           # 1024 rows were still 1/3 of a 1536x576 solve: 0.60 -> 0.40 s for two formats)
# shrink ratios of a group's range tried per row (1.0 alone: min..max, as mlx). Measured, uniform GPTQ 4:64:
# held-out KL 0.930x (demo), 0.843x (demo-moe); most from Mamba in_proj / out_proj (benchmarks/gptq_clip.py)
CLIP_GRID = tuple(round(1.0 - 0.025 * k, 3) for k in range(9))


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


def _inverse_cholesky(H) -> np.ndarray:
    """Upper U with U^T U = (H + damping)^-1, numpy float32; an all-zero H (no data) means plain rounding.

    With J the reversal, chol(J H J) = L gives H = (J L J)(J L J)^T, so U = J L^-1 J: one Cholesky and
    one triangular inverse, no explicit inverse of H. Both run in place (LAPACK's potrf and trtri through
    scipy) in one float32 copy of H, so besides H only one cols x cols array is held (mlx's linalg made two:
    a 9B down_proj's 15680^2 factor was 0.9 GiB each). mlx's linalg runs on the CPU stream anyway."""
    from scipy.linalg import lapack

    Hn = np.asarray(H)   # an evaluated mx array is read in place
    cols = Hn.shape[-1]
    diag = np.diagonal(Hn)[::-1].astype(np.float64)   # J H J's diagonal
    live = diag > 0
    if not live.any():
        return np.eye(cols, dtype=np.float32)
    shift = np.where(live, 0.0, 1.0) + DAMP * diag[live].sum() / live.sum()
    mean = (np.where(live, diag, 0.0) + shift).mean()
    idx = np.arange(cols)
    a = np.empty((cols, cols), dtype=np.float32, order="F")
    for extra in (0.0, 0.1, 1.0, 10.0):  # more damping only if H is numerically indefinite
        a.T[...] = Hn[::-1, ::-1]   # a.T is C-ordered: a sequential copy; J H J is symmetric
        if not live.all():   # dead columns: no coupling, 1 on the diagonal
            a[~live, :] = 0.0
            a[:, ~live] = 0.0
        a[idx, idx] += (shift + extra * mean).astype(np.float32)
        L, info = lapack.spotrf(a, lower=1, clean=1, overwrite_a=1)
        if info != 0:   # not positive definite at this damping
            continue
        Li, info = lapack.strtri(L, lower=1, overwrite_c=1)
        if info == 0 and np.isfinite(Li.max()) and np.isfinite(Li.min()):
            return Li[::-1, ::-1]   # J L^-1 J, a view: upper triangular
    return np.eye(cols, dtype=np.float32)


def _factor_rows(U, i1: int, i2: int, j1: int, j2: int):
    """U[..., i1:i2, j1:j2] as an mx float32 array: factors are kept in numpy (made there, in place) and
    sent to the device a block of rows at a time, so no second full copy of a factor exists."""
    import mlx.core as mx

    return mx.array(np.ascontiguousarray(U[..., i1:i2, j1:j2], np.float32))


def _round_block(W1, Ub, d, s, b, maxq):
    """One lazy block: round its columns in turn, each column's error pushed onto the block's later columns
    through the factor's rows Ub. One group's scale s and bias b (E, rows) cover the block. -> (q uint8,
    err) both (E, rows, n). Compiled: 32 columns of small element-wise steps are one graph, not ~300."""
    import mlx.core as mx

    qcols, errs = [], []
    for i in range(W1.shape[-1]):
        w = W1[..., i]
        q = mx.clip(mx.round((w - b) / s), 0.0, maxq)
        err = (w - (s * q + b)) / d[..., i]
        # U is upper triangular: the whole-block row leaves the columns already rounded untouched
        W1 = W1 - err[..., None] * Ub[..., i:i + 1, :]
        qcols.append(q.astype(mx.uint8)), errs.append(err)
    return mx.stack(qcols, axis=-1), mx.stack(errs, axis=-1)


def _group_scale(x, d, maxq, src, tiny: float, clip: tuple):
    """A group's scale and bias (E, rows) for its columns x (E, rows, group), values of the source dtype.
    Span min..max, or (`clip`) the range shrunk by the ratio whose rounding costs least in GPTQ's own
    measure, sum_j ((x_j - q_j) / d_j)^2 with d the factor's diagonal, picked per row (the first on ties).
    All ratios at once, broadcast over a leading axis: a dozen array operations, not a dozen per ratio."""
    import mlx.core as mx

    lo, hi = x.min(axis=-1), x.max(axis=-1)
    p = mx.array(clip, dtype=mx.float32).reshape(-1, *([1] * lo.ndim))   # (G, 1, 1)
    span = p * (hi - lo)
    sc = mx.where(span > 0, span / maxq, 1.0).astype(src).astype(mx.float32)
    s, b = mx.where(sc > 0, sc, tiny), (p * lo).astype(src).astype(mx.float32)   # (G, E, rows)
    if len(clip) == 1:
        return s[0], b[0]
    q = mx.clip(mx.round((x - b[..., None]) / s[..., None]), 0.0, maxq[..., None] if maxq.ndim else maxq)
    e = mx.square((x - (s[..., None] * q + b[..., None])) / d).sum(axis=-1)   # mx.square: ** is pow()
    k = mx.argmin(e, axis=0)[None]
    return mx.take_along_axis(s, k, axis=0)[0], mx.take_along_axis(b, k, axis=0)[0]


def _round_block_np(W1, Ub, d, s, b, maxq):
    """`_round_block` in numpy, for the CPU (mlx's CPU element-wise ops cost ~3x numpy's here, and a
    column's error updates only the block's later columns). W1 (E, rows, n) mx; Ub (E|1, n, n), d (E|1, n),
    s, b (E, rows), maxq a number or (E, 1) numpy. -> (q uint8, err) mx arrays (E, rows, n)."""
    import mlx.core as mx

    Wt = np.ascontiguousarray(np.moveaxis(np.array(W1, dtype=np.float32), -1, 0))   # (n, E, rows): columns
    n = Wt.shape[0]
    q, err = np.empty(Wt.shape, np.uint8), np.empty(Wt.shape, np.float32)
    coef = np.ascontiguousarray(np.moveaxis(Ub, -1, 0))[..., None]   # (n, E|1, n, 1): coef[j, :, i] = Ub[:, i, j]
    for i in range(n):
        w = Wt[i]
        qi = np.clip(np.rint((w - b) / s), 0.0, maxq)
        e = (w - (s * qi + b)) / d[:, i:i + 1]
        if i + 1 < n:
            Wt[i + 1:] -= coef[i + 1:, :, i] * e
        q[i], err[i] = qi, e
    return mx.array(np.moveaxis(q, 0, -1)), mx.array(np.moveaxis(err, 0, -1))


@functools.cache
def _compiled_round_block():
    import mlx.core as mx

    return mx.compile(_round_block)


@functools.cache
def _group_scale_fn(src, tiny: float, clip: tuple, compiled: bool):
    """`_group_scale` for these settings; compiled off the CPU only (on the CPU mlx's compiled element-wise
    graph measured 1.25-1.6x slower than the plain ops at 576-1536 rows, same values)."""
    import mlx.core as mx

    fn = functools.partial(_group_scale, src=src, tiny=tiny, clip=clip)
    return mx.compile(fn) if compiled else fn


def _gptq(W, U, bits, group: int, dtype: str, clip: tuple | None = None):
    """GPTQ a stack of (rows, cols) slices: W (E, rows, cols) float32, U (E or 1, cols, cols) their factors
    (numpy, as `_inverse_cholesky` makes them).
    `bits` is one number or one per slice (formats of one group size solved together: their copies of the
    weight stacked, each rounded to its own number of levels). Returns q (E, rows, cols) uint8 and scales,
    biases (E, rows, cols // group) float32 holding `dtype` values, w ~ scale * q + bias per group.
    `clip`: shrink ratios of each group's range searched (see `_group_scale`; default CLIP_GRID)."""
    import mlx.core as mx

    cols = W.shape[-1]
    if group % BLOCK or cols % group:
        raise ValueError(f"group {group} must be a multiple of {BLOCK} dividing the width {cols}")
    src = getattr(mx, dtype)
    clip = tuple(CLIP_GRID if clip is None else clip)
    if isinstance(bits, (list, tuple)):
        maxq = mx.array([[float(2 ** b - 1)] for b in bits])   # (E, 1): one per slice
    else:
        maxq = mx.array(float(2 ** bits - 1))
    tiny = float(np.finfo(np.float16).tiny) if dtype == "float16" else 1e-30
    d_np = np.ascontiguousarray(np.diagonal(U, axis1=-2, axis2=-1), np.float32)   # (E|1, cols)
    d = mx.array(d_np)[:, None, :]  # (E|1, 1, cols)
    on_cpu = numpy_on_cpu()   # the column loop in numpy (`_round_block_np`)
    step = _compiled_round_block()
    maxq_np = np.array(maxq) if on_cpu else None
    qs, S, B = [], [], []
    rest = W                     # columns not yet rounded, updated lazily: beyond the outer block once per block
    outer = max(OUTER, group)    # a multiple of every group size (32, 64, 128): groups never straddle blocks
    for o1 in range(0, cols, outer):
        o2 = min(o1 + outer, cols)
        cur, errs = rest[..., :o2 - o1], []   # the outer block's columns not yet rounded, kept up to date
        for i1 in range(o1, o2, BLOCK):
            i2 = min(i1 + BLOCK, o2)
            if i1 % group == 0:   # scale and bias from the group's columns as updated so far (`cur` is, here)
                s, b = _group_scale_fn(src, tiny, clip, not on_cpu)(cur[..., :group], d[..., i1:i1 + group], maxq)
                S.append(s), B.append(b)
                if on_cpu:
                    s_np, b_np = np.array(s), np.array(b)
            Urows = _factor_rows(U, i1, i2, i1, o2)               # (E|1, i2 - i1, o2 - i1)
            if on_cpu:
                q, err = _round_block_np(cur[..., :i2 - i1], U[..., i1:i2, i1:i2], d_np[:, i1:i2], s_np, b_np,
                                         maxq_np)
            else:
                q, err = step(cur[..., :i2 - i1], Urows[..., :i2 - i1], d[..., i1:i2], s, b, maxq)
            qs.append(q), errs.append(err)
            if i2 < o2:
                cur = mx.addmm(cur[..., i2 - i1:], err, Urows[..., i2 - i1:], alpha=-1.0)
            mx.eval(cur, qs[-1], S[-1], B[-1])
        if o2 < cols:   # the block's errors onto the later columns: one product of depth `outer`, not 8 of 32
            rest = mx.addmm(rest[..., o2 - o1:], mx.concatenate(errs, axis=-1), _factor_rows(U, o1, o2, o2, cols),
                            alpha=-1.0)
            mx.eval(rest)
    return mx.concatenate(qs, axis=-1), mx.stack(S, axis=-1), mx.stack(B, axis=-1)


def gptq_2d(W, H, bits: int, group: int, dtype: str, U=None, clip: tuple | None = None):
    """GPTQ one (rows, cols) matrix -> numpy (q uint8, scales, biases), scales/biases float32 holding
    `dtype` values. `U` (upper Cholesky factor of the damped inverse of H) may be passed instead of H.
    For inspection and tests: `Rounding` solves large tensors in bounded row chunks."""
    import mlx.core as mx

    U = _inverse_cholesky(H) if U is None else np.asarray(U, dtype=np.float32)
    q, S, B = _gptq(_f32(W)[None], U[None], bits, group, dtype, clip)
    mx.eval(q, S, B)
    return np.array(q[0]), np.array(S[0]), np.array(B[0])


def gptq_work_bytes(shape, formats: int = 2) -> int:
    """A solve's memory beyond its inputs: its steps' arrays (within WORKSET_BYTES) and the factors."""
    *lead, rows, cols = (int(d) for d in shape)
    slices = math.prod(lead)
    return min(WORKSET_BYTES, LIVE_COPIES * 4 * formats * slices * rows * cols) + slices * cols * cols * 4


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


def solve(w, H, Us: list, fmts: list, clip: tuple):
    """Per format (all of one group size): packed GPTQ arrays for `w` (source dtype, (..., rows, cols)) and,
    per 2-D slice, whether round-to-nearest was kept instead. `H`: one (cols, cols) or one per slice; `Us`:
    the inverse Cholesky factor of each (`_inverse_cholesky`), or one shared."""
    import mlx.core as mx

    *lead, rows, cols = w.shape
    W3 = w.reshape(-1, rows, cols)   # switch experts (E, out, in) get one Hessian each
    slices = W3.shape[0]
    Hs = _f32(H) if H.ndim == 2 else None   # one shared H, converted once
    dtype = str(w.dtype).rsplit(".", 1)[-1]
    F = len(fmts)
    kws = [dict(group_size=f.group_size, bits=f.bits, mode="affine") for f in fmts]
    worse = np.zeros((F, slices))   # per format and slice: GPTQ's output error minus round-to-nearest's
    stride = max(1, rows // CHECK_ROWS)   # ... estimated on every stride-th row of the slice
    # read by the steps' threads, which cannot evaluate this thread's graphs
    mx.eval(W3, *(a for a in (H, Hs) if isinstance(a, mx.array)))

    def step(at):   # one step's GPTQ arrays per format, and its rows' excess error over round-to-nearest
        e0, e1, r0, r1 = at
        Wsrc = W3[e0:e1, r0:r1]
        n = e1 - e0
        Uc = Us[0][None] if len(Us) == 1 else np.concatenate([np.stack(Us[e0:e1])] * F)
        Wf = Wsrc.astype(mx.float32)
        q, S, B = _gptq(mx.concatenate([Wf] * F) if F > 1 else Wf, Uc,
                        [f.bits for f in fmts for _ in range(n)] if F > 1 else fmts[0].bits,
                        fmts[0].group_size, dtype, clip)
        gs, excess = [], np.zeros((F, n))
        rs = slice((-r0) % stride, None, stride)   # the sampled rows of this step (global index % stride == 0)
        Hh = Hs if Hs is not None else [H[e] for e in range(e0, e1)]
        for k, fmt in enumerate(fmts):
            sl = slice(k * n, (k + 1) * n)
            g = (pack(q[sl], fmt.bits), S[sl].astype(w.dtype), B[sl].astype(w.dtype))
            mx.eval(*g)
            r = tuple(mx.quantize(Wsrc[:, rs], **kws[k]))
            excess[k] = stride * _excess_error(Wsrc[:, rs], tuple(a[:, rs] for a in g), r, Hh, kws[k])
            gs.append(g)
        return gs, excess

    # steps are independent given the factors: a tensor of many steps (a vocabulary table, stacked experts)
    # has them solved side by side on the cores (in order where the caller is itself one of several threads)
    at = list(_steps(slices, rows, cols, len(Us) > 1, copies=F))
    parts = []                      # per step: (e0, e1, r0, r1, per format GPTQ's packed arrays)
    for (e0, e1, r0, r1), (gs, excess) in zip(at, thread_map(step, at, item_bytes=WORKSET_BYTES)):
        worse[:, e0:e1] += excess
        parts.append((e0, e1, r0, r1, gs))
    # never worse than round-to-nearest on the output error GPTQ minimises, as the row sample estimates it
    # (matters at 2 bits); its arrays are not kept but quantized again, step by step, for the slices that
    # take them
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
