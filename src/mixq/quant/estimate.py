"""The sensitivity estimator: each (tensor, format)'s KL increase from one backward pass, no forward per pair.

For a small weight change dW of a layer y = W x, the KL divergence of the model from itself grows as
    dKL ~ 1/(2N) sum_t (g_t . dW x_t)^2,   g_t = d log p(label) / d y_t,  labels drawn from the model,
the Fisher quadratic form over the N calibration positions (the Fisher of the model's own distribution is
the KL's Hessian). Per layer it is taken in its Kronecker-factored form with a diagonal output factor,
    dKL ~ 1/(2N) sum_i G_i (dW A dW^T)_ii / n,   G_i = sum_t g_ti^2,  A = sum_t x_t x_t^T,
over the n rows the layer sees (routed experts: their own rows, G and A per expert), with dW the error
of the rounding that will really be written (GPTQ where used). A is the Gram GPTQ already rounds against;
(dW A dW^T)_ii is formed as dW A (out x in^2) or, where the layer sees fewer rows than it has inputs
(routed experts, very wide inputs), from the rows themselves (rows x in x out). Embeddings are looked up,
not multiplied, so theirs is the per-position form sum_t (g_t . dE[token_t])^2, exact in its cross terms.
The head's output Fisher is known exactly per position (diag(p) - p p^T for logits); its diagonal
sum_t p_ti (1 - p_ti) takes G's place, calibrated by the head's exact KL at the formats near the target.
GPTQ is solved only at those formats; the others are scaled from round-to-nearest (`rounded_estimates`).
In MoE models the routers' top-k choices are steps the form cannot see; `mixq.quant.flips` prices them
from a second set of output moments (`FisherStats.parts`) and adds that to these estimates.

Measured on the demo models against exact KL, the per-position form and this one rank all pairs alike
(Spearman 0.999 / 0.998); the diagonal-output form misprices whole tensor kinds by a constant (value
projections ~0.6x), which the per-kind calibration on exact points removes (see `mixq.quant.calibpass`),
and it costs in/N of the per-position form without keeping any per-position rows.
"""

from __future__ import annotations

import math

from mixq.core.experts import sorted_gather_mm
from mixq.quant.hessian import switch_rows

ESTIMATOR = "fisher-kfac-diag-v1+router-flips-v1"
EXPERT_CHUNK_BYTES = 64 << 20   # float32 rounding error of routed experts formed at a time (`FisherStats._ysq`)


class FisherStats:
    """Per Linear / SwitchLinear tensor of one block: the output-gradient second moments per channel (per
    expert for routed experts) and, where the estimate is formed from rows, the input rows. A second set
    of moments, from the routers' margin cotangent (`mixq.quant.flips`), gives the margins' mean-square
    shift for the same dW."""

    def __init__(self, n_positions: int):
        self.n_positions = n_positions
        self.gd: dict = {}      # path -> (out,) or (experts, out)
        self.gf: dict = {}      # path -> the same from the margin cotangent
        self.rows: dict = {}    # path -> list of input rows, when kept

    @staticmethod
    def _moment(rec, grad):
        import mlx.core as mx

        g = grad.astype(mx.float32)
        if rec._experts is None:
            return mx.square(g.reshape(-1, g.shape[-1])).sum(axis=0)
        gr, ids = switch_rows(g, rec.last_indices)
        return mx.zeros((rec._experts, gr.shape[-1])).at[ids].add(mx.square(gr))

    def add(self, path: str, rec, grad, flip_grad=None) -> None:
        import mlx.core as mx

        if rec._experts is None and rec.last_input.shape[-1] > self.n_positions:
            # wider than the rows it sees: keep the rows
            self.rows.setdefault(path, []).append(rec.last_input.reshape(-1, rec.last_input.shape[-1]))
        for store, gr in ((self.gd, grad), (self.gf, flip_grad)):
            if gr is None:
                continue
            g2 = self._moment(rec, gr)
            store[path] = g2 if path not in store else store[path] + g2
            mx.eval(store[path])

    def _ysq(self, path: str, H, dW, cheap: bool):
        """(dW A dW^T)_ii per output channel (per expert for routed experts); `cheap`: A's diagonal only.
        For routed experts `dW` may be a function (e0, e1) -> experts e0..e1's error, float32: then it is
        made a few experts at a time, never whole (a 30B-A3B expert tensor's is 2.5 GB in float32)."""
        import mlx.core as mx

        gd = self.gd[path]
        if hasattr(H, "rows"):
            return self._expert_ysq(H, dW, gd.shape, cheap)
        if cheap:
            return mx.square(dW.astype(mx.float32)) @ mx.diagonal(H).astype(mx.float32)
        if path in self.rows:
            ysq = mx.zeros((dW.shape[0],))
            for x in self.rows[path]:
                ysq = ysq + mx.square(x @ dW.T).sum(axis=0)
            return ysq
        return ((dW @ H.astype(mx.float32)) * dW).sum(axis=-1)

    @staticmethod
    def _expert_ysq(H, dW, shape: tuple, cheap: bool):
        """`_ysq` for routed experts (`H` their `ExpertGrams`, rows sorted by expert): each expert's rows
        through its own dW, EXPERT_CHUNK_BYTES of dW at a time."""
        import mlx.core as mx

        experts, out = shape
        part = dW if callable(dW) else (lambda e0, e1: dW[e0:e1].astype(mx.float32))
        cols = H.rows.shape[-1]
        per = max(1, EXPERT_CHUNK_BYTES // (4 * out * cols))
        diag = mx.zeros((experts, cols)).at[H.ids].add(mx.square(H.rows)) if cheap else None
        chunks = []
        for e0 in range(0, experts, per):
            e1 = min(e0 + per, experts)
            d = part(e0, e1)
            if cheap:
                ysq = (mx.square(d) @ diag[e0:e1, :, None])[..., 0]
            else:
                ysq = mx.zeros((e1 - e0, out))
                a0, b0 = H.span(e0, e1)
                step = max(1, (64 << 20) // (4 * max(out, 1)))
                for a in range(a0, b0, step):
                    b = min(a + step, b0)
                    ids = H.ids[a:b] - e0
                    y = sorted_gather_mm(H.rows[a:b][:, None, :], d, ids)[:, 0, :]   # rows sorted by expert
                    ysq = ysq.at[ids].add(mx.square(y))
                    mx.eval(ysq)
            mx.eval(ysq)
            chunks.append(ysq)
        return mx.concatenate(chunks, axis=0)

    def estimate(self, path: str, H, dW) -> float:
        """1/(2N) sum_i G_i (dW A dW^T)_ii / n for this tensor and the rounding error dW."""
        return self.parts(path, H, dW)[0]

    def cheap_estimate(self, path: str, H, dW) -> float:
        """`estimate` with A's diagonal only: sum_j dW_ij^2 A_jj in place of (dW A dW^T)_ii, for
        round-to-nearest errors, which are near independent across inputs (no matmul with A or the rows)."""
        return self.parts(path, H, dW, cheap=True)[0]

    def parts(self, path: str, H, dW, cheap: bool = False) -> tuple:
        """(the Fisher estimate, the routers' summed squared margin shift sum_{r,t} dm_rt^2 or 0.0) from
        one (dW A dW^T) diagonal."""
        ysq = self._ysq(path, H, dW, cheap)
        fisher = self._total(path, H, ysq, self.gd) / (2 * self.n_positions)
        return fisher, (self._total(path, H, ysq, self.gf) if path in self.gf else 0.0)

    def _total(self, path: str, H, ysq, store) -> float:
        """sum_i G_i ysq_i / n: n the positions, or per routed expert the rows it saw."""
        import mlx.core as mx

        gd = store[path]
        if hasattr(H, "rows"):
            counts = mx.zeros((gd.shape[0],)).at[H.ids].add(mx.ones(H.ids.shape))
            total = ((gd * ysq).sum(axis=-1) / mx.maximum(counts, 1.0)).sum()
        else:
            total = (gd * ysq).sum() / self.n_positions
        return float(total.item())


def embedding_estimate(grads: list, tokens: list, table_rows, q, n_positions: int, flip_grads=None) -> tuple:
    """The embedding's rows as looked up at every position: dW x_t = the rounded row's error. Returns
    (the Fisher estimate 1/(2N) sum_t (g_t . d_t)^2, and with `flip_grads` (the routers' margin cotangent,
    `mixq.quant.flips`) the margins' summed squared shift sum_t (gf_t . d_t)^2, else 0.0), from one row
    error per batch."""
    import mlx.core as mx

    total, shift = mx.array(0.0), mx.array(0.0)
    for b, (g, x) in enumerate(zip(grads, tokens)):
        d = table_rows(x) - q.take(x, mx.float32)
        total = total + mx.square((g * d).sum(axis=-1)).sum()
        if flip_grads is not None:
            shift = shift + mx.square((flip_grads[b] * d).sum(axis=-1)).sum()
        mx.eval(total, shift)
    return float(total.item()) / (2 * n_positions), float(shift.item())


def near_formats(shape, fmts: list, target_bpw: float, source_dtype) -> list:
    """The affine formats of `fmts` this tensor can take that sit nearest the target in bits per weight:
    the largest at or below it and the smallest above (one if the target is outside the range)."""
    from mixq.core.formats import applicable, bits_per_weight

    aff = sorted((f for f in fmts if f.mode == "affine" and applicable(shape, f)),
                 key=lambda f: (bits_per_weight(f, source_dtype), -f.group_size))
    below = [f for f in aff if bits_per_weight(f, source_dtype) <= target_bpw]
    above = [f for f in aff if bits_per_weight(f, source_dtype) > target_bpw]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


def _nearest(f, solved: list):
    """The solved format closest to `f` in bits, then in group size."""
    return min(solved, key=lambda g: (abs(g.bits - f.bits), abs(math.log2(g.group_size / f.group_size)), g.bits))


def _work_bytes(w) -> int:
    """A format's round-to-nearest estimate's temporaries: a few float32 copies of the tensor."""
    return 4 * 4 * math.prod(int(d) for d in w.shape)


def rounded_estimates(rounding, path: str, w, fmts: list, near: list, estimate, cheap=None,
                      on_solved=None) -> dict:
    """str(format) -> the estimate's components (a tuple of floats) for `w` rounded to each format as the
    convert would write it, without solving GPTQ, or forming the full estimate, for every format.

    GPTQ is solved at the `near` formats (the ones the allocator picks around the target) and estimated
    in full there. Every other format is rounded to nearest and estimated by `cheap` (default: `estimate`),
    then scaled per component by the ratio measured at the nearest near format: GPTQ's full estimate over
    round-to-nearest's cheap one for formats GPTQ applies to, round-to-nearest's full over its cheap one
    for those it does not (microscaled formats, no Hessian; at a near format they get the full estimate).
    `estimate`, `cheap`: QuantizedWeight -> tuple; `on_solved(fmt, QuantizedWeight)` sees each near
    format as written."""
    from mixq.core.lanes import thread_map
    from mixq.quant.qweight import round_weight, round_weights

    import mlx.core as mx

    mx.eval(w)   # read by the worker threads below, which cannot evaluate this thread's graphs
    given = cheap is not None
    cheap = cheap or estimate
    gptq = [f for f in fmts if rounding is not None and rounding.uses_gptq(path, f)]
    near = [f for f in near if f in fmts]
    use = [f for f in near if f in gptq]
    plain_far = [f for f in fmts if f not in gptq and f not in near]
    # near formats whose full round-to-nearest estimate scales a plain format's cheap one
    wanted = {_nearest(f, near) for f in plain_far} if near and given else set()
    full, low, rtn_full = {}, {}, {}
    if use:
        solved = round_weights(rounding, path, w, use)
        for f in use:
            q = solved.pop(str(f))
            full[f] = estimate(q)
            if on_solved is not None:
                on_solved(f, q)
            del q
    def rtn(f):   # a thread each: no shared state
        q = round_weight(None, path, w, f)
        top = estimate(q) if (f in near and f not in use) or f in wanted else None
        return top, (cheap(q) if given or top is None else top), q if f in near and f not in use else None

    # round-to-nearest and its estimates: independent per format, on the cores side by side
    for f, (top, lo, q) in zip(fmts, thread_map(rtn, fmts, item_bytes=_work_bytes(w))):
        if top is not None:
            rtn_full[f] = top
        if q is not None:   # a near format written round-to-nearest
            full[f] = top
            if on_solved is not None:
                on_solved(f, q)
        low[f] = lo
        del q

    def scaled(f, top, n):
        return tuple(x * (a / b if b > 0 else 1.0) for x, a, b in zip(low[f], top[n], low[n]))

    out = {}
    for f in fmts:
        if f in full:
            out[str(f)] = full[f]
        elif f in gptq and use:
            out[str(f)] = scaled(f, full, _nearest(f, use))
        elif f in plain_far and wanted:
            out[str(f)] = scaled(f, rtn_full, _nearest(f, near))
        else:
            out[str(f)] = low[f]
    return out


def head_estimate(G, A, weight, q, n_positions: int, rows=None, diagonal: bool = False) -> float:
    """The head role's Fisher estimate, 1/(2N) sum_i G_i (dW A dW^T)_ii / N, with G the head's Fisher
    diagonal (sum_t p_ti (1 - p_ti)) and A the Gram of its input; taken a chunk of head rows at a time.
    With `rows` (the inputs themselves, when there are fewer than the head's width) sum_t (dW x_t)^2;
    `diagonal`: A's diagonal only (sum_j dW_ij^2 A_jj, the cheap form for round-to-nearest errors)."""
    import mlx.core as mx

    from mixq.core.head import chunk_rows

    V, d = int(weight.shape[0]), int(weight.shape[-1])
    if diagonal:
        if rows is not None:
            a_diag = sum(mx.square(x.reshape(-1, d).astype(mx.float32)).sum(axis=0) for x in rows)
        else:
            a_diag = mx.diagonal(A).astype(mx.float32)
        rows, A = None, None
    step = chunk_rows(d, n_positions if rows is not None else d)
    total = 0.0
    A32 = None if rows is not None or A is None else A.astype(mx.float32)
    for a in range(0, V, step):
        b = min(a + step, V)
        dW = weight[a:b].astype(mx.float32) - q.rows(a, b, mx.float32)
        if diagonal:
            ysq = mx.square(dW) @ a_diag
        elif rows is not None:
            ysq = mx.zeros((b - a,))
            for x in rows:
                ysq = ysq + mx.square(x.reshape(-1, d) @ dW.T).sum(axis=0)
        else:
            ysq = ((dW @ A32) * dW).sum(axis=-1)
        part = (G[a:b] * ysq).sum()
        mx.eval(part)
        total += float(part.item())
    return total / (2 * n_positions * n_positions)
