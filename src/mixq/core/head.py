"""The output projection run in vocabulary chunks: a 131k-row head never exists whole in float32, and no
full-vocabulary log-probabilities are kept for any position.

The float reference of a set of windows is stored as its final normed hidden states plus, per position,
the log-sum-exp, the argmax and the log-probability of the next token (`Reference`). A KL against it
recomputes the reference logits chunk by chunk next to the compared ones (`Head.compare`): exact, for one
extra head projection per comparison, and memory of one chunk of logits.

Per position, with p the reference and q the compared distribution, z their logits and d = z_p - z_q:
    KL(p || q) = sum_i p_i d_i + log sum_i p_i exp(-d_i) = A + log1p(B - A),
    A = sum_i p_i d_i,  B = sum_i p_i (exp(-d_i) - 1 + d_i)   (p normalised over the accumulated sum)
accumulated in one pass over the chunks; no difference of two log-sum-exps is taken, so a KL of 1e-8
keeps its digits in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

CHUNK_BYTES = 128 << 20  # float32 working set of one chunk of head rows


class Head:
    """`weight` (V, d) in any float dtype, or a `QuantizedWeight` (rows dequantized per chunk)."""

    def __init__(self, weight, *, bias=None, compute=None):
        import mlx.core as mx

        self.weight, self.bias = weight, bias
        self.compute = compute or mx.float32
        self.vocab, self.dim = int(weight.shape[0]), int(weight.shape[-1])
        rows = max(256, CHUNK_BYTES // (4 * max(self.dim, 1)))
        self.bounds = [(a, min(a + rows, self.vocab)) for a in range(0, self.vocab, rows)]

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

        return mx.concatenate([self.chunk(hn, a, b) for a, b in self.bounds], axis=-1)

    # -- streamed statistics ----------------------------------------------------------------------
    def reference(self, hn, targets=None) -> "Reference":
        """lse, argmax and next-token log-prob per position of the logits of `hn` (…, d)."""
        import mlx.core as mx

        lse = _Lse()
        best_v = best_i = tgt = None
        for a, b in self.bounds:
            z = self.chunk(hn, a, b)
            lse.add(z)
            best_v, best_i = _argmax_merge(best_v, best_i, z, a)
            if targets is not None:
                tgt = _gather_in(tgt, z, targets, a, b)
            mx.eval(lse.m, lse.s, best_v, best_i, *(() if tgt is None else (tgt,)))
        out = lse.value()
        nll = None if targets is None else out - tgt
        return Reference(hn=hn, lse=out, argmax=best_i, nll=nll)

    def compare(self, hn, ref: "Reference", ref_head: "Head", targets=None) -> dict:
        """Per position: KL(ref || this head on hn), argmax agreement, next-token NLL (if targets)."""
        return compare_many([(self, hn)], ref, ref_head, targets)[0]

    def sample(self, hn, key):
        """One label per position drawn from softmax(logits) (Gumbel-max over the chunks, keyed)."""
        import mlx.core as mx

        keys = mx.random.split(key, len(self.bounds))
        best_v = best_i = None
        for c, (a, b) in enumerate(self.bounds):
            z = self.chunk(hn, a, b)
            g = mx.random.gumbel(shape=z.shape, key=keys[c])
            best_v, best_i = _argmax_merge(best_v, best_i, z + g, a)
            mx.eval(best_v, best_i)
        return best_i

    def loglik_cotangent(self, hn, labels, lse):
        """d/d hn of sum over positions of log softmax(logits)[label]: sum_c (onehot - p)_c W_c."""
        import mlx.core as mx

        g = mx.zeros(hn.shape, dtype=mx.float32)
        for a, b in self.bounds:
            z = self.chunk(hn, a, b)
            p = mx.exp(z - lse[..., None])
            inside = (labels >= a) & (labels < b)
            onehot = (mx.arange(a, b) == labels[..., None]) & inside[..., None]
            g = g + (onehot.astype(p.dtype) - p) @ self.rows(a, b)
            mx.eval(g)
        return g


def compare_many(compared: list, ref: "Reference", ref_head: "Head", targets=None) -> list[dict]:
    """`compared`: (head, hn) pairs, each against the same reference; the reference's chunk of logits and
    probabilities is computed once for all of them. Per pair: KL, argmax agreement, next-token NLL."""
    import mlx.core as mx

    shape = ref.lse.shape
    acc = [{"s0": mx.zeros(shape), "a": mx.zeros(shape), "b": mx.zeros(shape), "v": None, "i": None, "t": None}
           for _ in compared]
    for lo, hi in ref_head.bounds:
        zp = ref_head.chunk(ref.hn, lo, hi)
        p = mx.exp(zp - ref.lse[..., None])
        s0 = p.sum(axis=-1)
        for (head, hn), st in zip(compared, acc):
            zq = head.chunk(hn, lo, hi)
            d = zp - zq
            st["s0"] = st["s0"] + s0
            st["a"] = st["a"] + (p * d).sum(axis=-1)
            st["b"] = st["b"] + (p * (mx.expm1(-d) + d)).sum(axis=-1)
            st["v"], st["i"] = _argmax_merge(st["v"], st["i"], zq, lo)
            if targets is not None:
                st["t"] = _gather_in(st["t"], zq, targets, lo, hi)
            mx.eval(*(x for x in st.values() if x is not None))
    out = []
    for st in acc:
        # KL = sum p d + log sum p e^-d with d = z_p - z_q, written A + log1p(B - A) over the normalised p: no
        # difference of two log-sum-exps (O(10) each) is ever taken, so tiny KLs keep their digits
        an, bn = st["a"] / st["s0"], st["b"] / st["s0"]
        r = {"kl": mx.maximum(an + mx.log1p(bn - an), 0.0), "same": st["i"] == ref.argmax}
        if targets is not None:
            r["nll"] = ref.lse + mx.log(st["s0"] - st["a"] + st["b"]) - st["t"]
        out.append(r)
    return out


@dataclass
class Reference:
    """What a KL against the float model needs of one batch of windows (no full-vocabulary arrays)."""

    hn: object      # final normed hidden states (…, d), compute dtype
    lse: object     # (…,) log-sum-exp of the logits
    argmax: object  # (…,) int
    nll: object | None = None  # (…,) -log p(next token), when targets were given

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.hn, self.lse, self.argmax, self.nll) if a is not None)


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
