"""The output projection run in vocabulary chunks: a 131k-row head never exists whole in float32, and no
full-vocabulary log-probabilities are kept for any position.

The float reference of a set of windows is stored as its final normed hidden states plus, per position,
the log-sum-exp, the argmax and the log-probability of the next token (`Reference`). A KL against it
recomputes the reference logits chunk by chunk next to the compared ones (`Head.compare`): exact, for one
extra head projection per comparison, and memory of one chunk of logits.

Per position, with p the reference and q the compared distribution, z their logits and d = z_p - z_q:
    KL(p || q) = sum_i p_i d_i + log sum_i p_i exp(-d_i) = A + log1p(B),
    A = sum_i p_i d_i,  B = sum_i p_i expm1(-d_i)   (p normalised over the accumulated sum)
accumulated in one pass over the chunks; no difference of two log-sum-exps is taken, so a KL of 1e-8
keeps its digits in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixq.core.blas import numpy_on_cpu

CHUNK_BYTES = 128 << 20   # float32 working set of one chunk of head rows
LOGITS_BYTES = 32 << 20   # float32 logits of one chunk (its temporaries are a few times that)
SAMPLE_LOGITS = 1 << 26   # comparisons that only calibrate (`sample_positions`): at most this many logits


def chunk_rows(dim: int, positions: int) -> int:
    """Head rows per vocabulary chunk: at most CHUNK_BYTES of float32 rows and LOGITS_BYTES of logits."""
    return max(256, min(CHUNK_BYTES // (4 * max(dim, 1)), LOGITS_BYTES // (4 * max(positions, 1))))


class Head:
    """`weight` (V, d) in any float dtype, or a `QuantizedWeight` (rows dequantized per chunk)."""

    def __init__(self, weight, *, bias=None, compute=None):
        import mlx.core as mx

        self.weight, self.bias = weight, bias
        self.compute = compute or mx.float32
        self.vocab, self.dim = int(weight.shape[0]), int(weight.shape[-1])
        self.bounds = self.bounds_for(1)

    def bounds_for(self, positions: int) -> list:
        """Vocabulary chunks for `positions` rows of hidden states: bounded weight rows and logits."""
        rows = chunk_rows(self.dim, positions)
        return [(a, min(a + rows, self.vocab)) for a in range(0, self.vocab, rows)]

    def rows(self, a: int, b: int):
        w = self.weight.rows(a, b) if hasattr(self.weight, "rows") else self.weight[a:b]
        return w.astype(self.compute)

    def chunk(self, hn, a: int, b: int):
        z = hn @ self.rows(a, b).T
        if self.bias is not None:
            z = z + self.bias[a:b].astype(z.dtype)
        return z

    def logits(self, hn):
        """Full logits: for short inputs only (checks, tests, generation of one position)."""
        import mlx.core as mx

        return mx.concatenate([self.chunk(hn, a, b) for a, b in self.bounds_for(_positions(hn))], axis=-1)

    # -- streamed statistics ----------------------------------------------------------------------
    def reference(self, hn, targets=None, sample_key=None) -> "Reference":
        """lse, argmax and next-token log-prob per position of the logits of `hn` (…, d); with `sample_key`,
        also one label per position drawn from them (the same chunks: no second projection).

        Labels are drawn chunk by chunk as a weighted reservoir: after chunk c the label moves into it with
        probability (its mass) / (the mass so far), to a row drawn within it by inverse CDF; two uniforms
        per position and chunk, exact. (Gumbel-max needed a random number and an exp per logit; mlx's
        CPU exp is ~30x numpy's, which made the reference ~5x the cost of its projection.)"""
        import mlx.core as mx

        bounds = self.bounds_for(_positions(hn))
        keys = None if sample_key is None else mx.random.split(sample_key, len(bounds))
        if numpy_on_cpu():
            lse, best_i, tgt, labels = self._reference_np(hn, bounds, targets, keys)
        else:
            lse, best_i, tgt, labels = self._reference_mx(hn, bounds, targets, keys)
        nll = None if targets is None else lse - tgt
        return Reference(hn=hn, lse=lse, argmax=best_i, nll=nll, labels=labels)

    def _reference_np(self, hn, bounds, targets, keys):
        import mlx.core as mx

        shape, P = hn.shape[:-1], _positions(hn)
        tg = None if targets is None else np.array(targets).reshape(-1)
        m = s = best_v = best_i = tgt = labels = None
        for c, (a, b, (z,)) in enumerate(_prefetched(bounds, lambda a, b: [self.chunk(hn, a, b)], True)):
            z = np.array(z, dtype=np.float32).reshape(P, b - a)
            best_v, best_i = _argmax_merge_np(best_v, best_i, z, a)
            if tg is not None:
                tgt = _gather_in_np(tgt, z, tg, a, b)
            m_new = best_v   # the running max over the chunks so far is the argmax's value
            np.subtract(z, m_new[:, None], out=z)
            np.exp(z, out=z)                      # z is now exp(logit - running max)
            mass = z.sum(axis=-1, dtype=np.float64)
            s = mass if s is None else s * np.exp(m - m_new) + mass
            m = m_new
            if keys is not None:
                u = np.array(mx.random.uniform(shape=(2, P), key=keys[c]), dtype=np.float64)
                if labels is None:
                    labels = np.zeros(P, dtype=np.int64)
                moved = np.nonzero(u[0] * s < mass)[0]   # P(move) = mass / s, s including this chunk
                if moved.size:
                    cum = np.cumsum(z[moved], axis=-1, dtype=np.float64)
                    k = (cum < (u[1][moved] * cum[:, -1])[:, None]).sum(axis=-1)
                    labels[moved] = a + np.minimum(k, b - a - 1)
        lse = mx.array((m + np.log(s)).astype(np.float32).reshape(shape))
        am = mx.array(best_i.astype(np.int32).reshape(shape))
        tgt = None if tgt is None else mx.array(tgt.astype(np.float32).reshape(shape))
        labels = None if labels is None else mx.array(labels.astype(np.int32).reshape(shape))
        return lse, am, tgt, labels

    def _reference_mx(self, hn, bounds, targets, keys):
        import mlx.core as mx

        lse = _Lse()
        best_v = best_i = tgt = labels = None
        for c, (a, b) in enumerate(bounds):
            z = self.chunk(hn, a, b)
            lse.add(z)
            best_v, best_i = _argmax_merge(best_v, best_i, z, a)
            if targets is not None:
                tgt = _gather_in(tgt, z, targets, a, b)
            if keys is not None:   # the reservoir of `reference`, with the same uniforms as the numpy path
                u = mx.random.uniform(shape=(2, *z.shape[:-1]), key=keys[c])
                e = mx.exp(z - lse.m[..., None])
                mass = e.sum(axis=-1)
                cum = mx.cumsum(e, axis=-1)
                k = mx.minimum((cum < (u[1] * cum[..., -1])[..., None]).sum(axis=-1), b - a - 1).astype(mx.int32) + a
                labels = k if labels is None else mx.where(u[0] * lse.s < mass, k, labels)
            mx.eval(lse.m, lse.s, best_v, best_i, *(x for x in (tgt, labels) if x is not None))
        return lse.value(), best_i, tgt, labels

    def compare(self, hn, ref: "Reference", ref_head: "Head", targets=None) -> dict:
        """Per position: KL(ref || this head on hn), argmax agreement, next-token NLL (if targets)."""
        return compare_many([(self, hn)], ref, ref_head, targets)[0]

    def sample(self, hn, key):
        """One label per position drawn from softmax(logits) (chunk by chunk, keyed; see `reference`)."""
        return self.reference(hn, sample_key=key).labels

    def loglik_cotangent(self, hn, labels, lse, fisher=None):
        """d/d hn of sum over positions of log softmax(logits)[label]: sum_c (onehot - p)_c W_c. With
        `fisher` (a list), appends the head's Fisher diagonal over these positions, sum_t p_tc (1 - p_tc)
        per vocabulary row: the expectation of the squared cotangent over labels drawn from p."""
        import mlx.core as mx

        g = mx.zeros(hn.shape, dtype=mx.float32)
        diag = []
        on_cpu = numpy_on_cpu()
        for a, b in self.bounds_for(_positions(hn)):
            z = self.chunk(hn, a, b)
            if on_cpu:  # numpy's exp is several times mlx's on the CPU
                p = mx.array(np.exp(np.array(z) - np.array(lse)[..., None]))
            else:
                p = mx.exp(z - lse[..., None])
            inside = (labels >= a) & (labels < b)
            onehot = (mx.arange(a, b) == labels[..., None]) & inside[..., None]
            g = g + (onehot.astype(p.dtype) - p) @ self.rows(a, b)
            if fisher is not None:
                p2 = p.reshape(-1, b - a)
                diag.append((p2 * (1.0 - p2)).sum(axis=0))
                mx.eval(diag[-1])
            mx.eval(g)
        if fisher is not None:
            fisher.append(mx.concatenate(diag))
        return g


def compare_many(compared: list, ref: "Reference", ref_head: "Head", targets=None) -> list[dict]:
    """`compared`: (head, hn) pairs, each against the same reference; the reference's chunk of logits and
    probabilities is computed once for all of them. Per pair: KL, argmax agreement, next-token NLL.

    Per position, with d = z_p - z_q over the vocabulary and p normalised over the accumulated sum s0:
    KL = A + log1p(B) with A = sum p d / s0 and B = sum p expm1(-d) / s0, so no difference of two
    log-sum-exps (O(10) each) is ever taken and a KL of 1e-8 keeps its digits in float32. On the CPU the
    per-element work runs in numpy (its SIMD exp is several times mlx's there); elsewhere in mlx."""
    import mlx.core as mx

    shape = ref.lse.shape
    on_cpu = numpy_on_cpu()
    acc = [{"s0": 0.0, "a": 0.0, "b": 0.0, "v": None, "i": None, "t": None} for _ in compared]
    lse = np.array(ref.lse).reshape(-1, 1) if on_cpu else ref.lse[..., None]
    tg = None if targets is None else (np.array(targets).reshape(-1) if on_cpu else targets)

    def logits(lo, hi):
        return [ref_head.chunk(ref.hn, lo, hi)] + [head.chunk(hn, lo, hi) for head, hn in compared]

    for lo, hi, (zp, *zqs) in _prefetched(ref_head.bounds_for(_positions(ref.hn)), logits, on_cpu):
        if on_cpu:
            zp = np.array(zp).reshape(-1, hi - lo)
            p = np.exp(zp - lse)
            s0 = p.sum(axis=-1)
        else:
            p = mx.exp(zp - lse)
            s0 = p.sum(axis=-1)
        for zq, st in zip(zqs, acc):
            if on_cpu:
                _stats_np(st, zp, p, s0, np.array(zq).reshape(-1, hi - lo), lo, hi, tg)
            else:
                _stats_mx(st, zp, p, s0, zq, lo, hi, targets)
    out = []
    for st in acc:
        a, b, s0, v, i, t = (mx.array(np.asarray(st[k]).reshape(shape)) if on_cpu and st[k] is not None else st[k]
                             for k in ("a", "b", "s0", "v", "i", "t"))
        an, bn = a / s0, b / s0
        r = {"kl": mx.maximum(an + mx.log1p(bn), 0.0), "same": i == ref.argmax}
        if targets is not None:
            r["nll"] = ref.lse + mx.log(s0 + b) - t
        out.append(r)
    return out


def _prefetched(bounds: list, make, on: bool = True):
    """(lo, hi, make(lo, hi)) per chunk; with `on`, the next chunk's arrays are computed by mlx (BLAS)
    while the caller works on this one in numpy, the two cores busy at once (`mx.async_eval`)."""
    import mlx.core as mx

    nxt = None
    for k, (lo, hi) in enumerate(bounds):
        cur = nxt if nxt is not None else make(lo, hi)
        if on:
            if nxt is None:
                mx.async_eval(cur)
            nxt = make(*bounds[k + 1]) if k + 1 < len(bounds) else None
            if nxt is not None:
                mx.async_eval(nxt)
        yield lo, hi, cur
        del cur


def _stats_np(st: dict, zp, p, s0, zq, lo: int, hi: int, targets) -> None:
    d = zp - zq
    st["s0"] = st["s0"] + s0
    st["a"] = st["a"] + np.einsum("ij,ij->i", p, d)
    np.negative(d, out=d)
    np.expm1(d, out=d)
    st["b"] = st["b"] + np.einsum("ij,ij->i", p, d)
    st["v"], st["i"] = _argmax_merge_np(st["v"], st["i"], zq, lo)
    if targets is not None:
        st["t"] = _gather_in_np(st["t"], zq, targets, lo, hi)


def _argmax_merge_np(best_v, best_i, z, offset: int):
    """`_argmax_merge` for a numpy chunk of logits (positions, rows)."""
    i = z.argmax(axis=-1)
    v = np.take_along_axis(z, i[:, None], axis=-1)[:, 0]
    if best_v is None:
        return v, i + offset
    take = v > best_v  # ties keep the earlier (lower) index, as a full argmax does
    return np.where(take, v, best_v), np.where(take, i + offset, best_i)


def _gather_in_np(acc, z, targets, a: int, b: int):
    """`_gather_in` for a numpy chunk of logits (positions, rows) and flat targets."""
    inside = (targets >= a) & (targets < b)
    got = np.where(inside, z[np.arange(z.shape[0]), np.clip(targets - a, 0, b - a - 1)], 0.0)
    return got if acc is None else acc + got


def _stats_mx(st: dict, zp, p, s0, zq, lo: int, hi: int, targets) -> None:
    import mlx.core as mx

    d = zp - zq
    st["s0"] = st["s0"] + s0
    st["a"] = st["a"] + (p * d).sum(axis=-1)
    st["b"] = st["b"] + (p * mx.expm1(-d)).sum(axis=-1)
    st["v"], st["i"] = _argmax_merge(st["v"], st["i"], zq, lo)
    if targets is not None:
        st["t"] = _gather_in(st["t"], zq, targets, lo, hi)
    mx.eval(*(x for x in st.values() if isinstance(x, mx.array)))


@dataclass
class Reference:
    """What a KL against the float model needs of one batch of windows (no full-vocabulary arrays)."""

    hn: object      # final normed hidden states (…, d), compute dtype
    lse: object     # (…,) log-sum-exp of the logits
    argmax: object  # (…,) int
    nll: object | None = None  # (…,) -log p(next token), when targets were given
    labels: object | None = None  # (…,) labels drawn from the distribution, when a key was given

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.hn, self.lse, self.argmax, self.nll, self.labels) if a is not None)

    def take(self, idx) -> "Reference":
        """The reference at the flat positions `idx` (an int array): every field flattened to them."""
        def flat(a):
            return None if a is None else a.reshape(-1)[idx]

        return Reference(hn=self.hn.reshape(-1, self.hn.shape[-1])[idx], lse=flat(self.lse),
                         argmax=flat(self.argmax), nll=flat(self.nll), labels=flat(self.labels))


def sample_positions(counts: list, vocab: int, seed: int = 0, budget: int | None = None) -> list | None:
    """Per batch (`counts` positions each): sorted flat indices of a seeded sample of its positions, the
    same fraction of every batch, so that positions x `vocab` stays within `budget` logits; None when all
    of them already do. For the comparisons that only calibrate the estimator (exact KL of one tensor at
    one format, a mean over positions): at a 49k-151k vocabulary each was a head projection of every
    position. The held-out and the plan's own comparisons take every position."""
    import mlx.core as mx

    budget = SAMPLE_LOGITS if budget is None else budget
    total = sum(counts)
    if total * vocab <= budget:
        return None
    frac = budget / (total * vocab)
    rng = np.random.default_rng(seed)
    out = []
    for n in counts:
        k = max(1, min(n, round(n * frac)))
        out.append(mx.array(np.sort(rng.choice(n, size=k, replace=False)).astype(np.int32)))
    return out


def _positions(hn) -> int:
    n = 1
    for d in hn.shape[:-1]:
        n *= int(d)
    return n


class _Lse:
    """Running log-sum-exp over the last axis, chunk by chunk."""

    def __init__(self):
        self.m = self.s = None

    def add(self, z) -> None:
        import mlx.core as mx

        cm = z.max(axis=-1)
        if self.m is None:
            self.m, self.s = cm, mx.exp(z - cm[..., None]).sum(axis=-1)
            return
        m = mx.maximum(self.m, cm)
        self.s = self.s * mx.exp(self.m - m) + mx.exp(z - m[..., None]).sum(axis=-1)
        self.m = m

    def value(self):
        import mlx.core as mx

        return self.m + mx.log(self.s)


def _argmax_merge(best_v, best_i, z, offset: int):
    import mlx.core as mx

    i = mx.argmax(z, axis=-1)
    v = mx.take_along_axis(z, i[..., None], axis=-1)[..., 0]
    i = i + offset
    if best_v is None:
        return v, i
    take = v > best_v  # ties keep the earlier (lower) index, as a full argmax does
    return mx.where(take, v, best_v), mx.where(take, i, best_i)


def _gather_in(acc, z, targets, a: int, b: int):
    import mlx.core as mx

    inside = (targets >= a) & (targets < b)
    local = mx.clip(targets - a, 0, b - a - 1)
    got = mx.take_along_axis(z, local[..., None], axis=-1)[..., 0]
    got = mx.where(inside, got, 0.0)
    return got if acc is None else acc + got
