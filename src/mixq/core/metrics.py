"""Distribution-level quality metrics between a reference model's logits and another model's.

All arithmetic is float32 (inputs of any float dtype are cast chunk by chunk). Memory stays bounded: the
(B, L, V) logits are processed in slices along the batch axis (and along L when one row is itself large),
each slice evaluated before the next, so no (B, L, V) float32 temporary is ever built.

Conventions, used by every function here:

* `logits` is what a causal LM returns for `tokens`: shape (B, L, V); position t predicts token t+1.
* `mask` is (B, L), aligned with `tokens` (True / nonzero = a valid position, e.g. not padding).
* KL and top-1 agreement are per *position* of the logits (all L positions; a position counts when
  mask[:, t] is set).
* `perplexity(logits, tokens)` is next-token: logits[:, :-1] are scored against tokens[:, 1:], and a
  target counts when mask[:, t+1] is set. Pass `shifted=True` when the inputs are already aligned
  (logits[:, t] scored against targets[:, t], mask[:, t]).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from mixq.core.blas import numpy_on_cpu

# Elements (B*L*V) of float32 per processed slice: 2**24 floats = 64 MiB per temporary.
CHUNK_ELEMENTS = 1 << 24
SHIFT_LIMIT = 60.0   # KL: exp(-d) is taken relative to e^c, c = max(0, max(-d) - SHIFT_LIMIT) (float32 ends at e^88)


def log_probs(logits: mx.array) -> mx.array:
    """log_softmax over the last axis, in float32."""
    x = logits.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def _check3(name: str, a) -> None:
    if a.ndim != 3:
        raise ValueError(f"{name}: expected (B, L, V) logits, got shape {tuple(a.shape)}")


def _slices(shape: tuple[int, int, int], chunk_elements: int | None = None):
    """(batch slice, position slice) pairs covering (B, L) so each slice holds <= chunk_elements logits."""
    b, l, v = shape
    budget = max(1, int(chunk_elements or CHUNK_ELEMENTS))
    per_row = max(1, l * v)
    if per_row <= budget:
        rows = max(1, budget // per_row)
        for i in range(0, b, rows):
            yield slice(i, min(b, i + rows)), slice(0, l)
    else:
        cols = max(1, budget // max(1, v))
        for i in range(b):
            for j in range(0, l, cols):
                yield slice(i, i + 1), slice(j, min(l, j + cols))


def _per_position(fn, *arrays, chunk_elements: int | None = None) -> mx.array:
    """Apply fn(slices of arrays) -> (b, l) over the slices of arrays[0]'s (B, L, V) and reassemble."""
    b, l, _ = arrays[0].shape
    rows = []
    for bs, ls in _slices(tuple(arrays[0].shape), chunk_elements):
        out = fn(*(a[bs, ls] for a in arrays))
        mx.eval(out)
        rows.append((bs, ls, out))
    if len(rows) == 1:
        return rows[0][2]
    if all(ls == slice(0, l) for _, ls, _ in rows):
        return mx.concatenate([r for _, _, r in rows], axis=0)
    # split along L too: gather each batch row's pieces
    by_row: dict[int, list] = {}
    for bs, ls, r in rows:
        by_row.setdefault(bs.start, []).append(r)
    return mx.concatenate([mx.concatenate(by_row[i], axis=1) for i in sorted(by_row)], axis=0)


def logsumexp(logits: mx.array, *, chunk_elements: int | None = None) -> mx.array:
    """log-sum-exp of the logits at every position, (B, L) float32: a reference's, computed once for the
    KLs of several models against it (`kl_per_token(ref_lse=...)`)."""
    _check3("logits", logits)
    return _per_position(lambda x: mx.logsumexp(x.astype(mx.float32), axis=-1), logits,
                         chunk_elements=chunk_elements)


def kl_per_token(ref_logits: mx.array, logits: mx.array, *, chunk_elements: int | None = None,
                 ref_lse: mx.array | None = None) -> mx.array:
    """KL(p_ref || p) at every position, shape (B, L), float32, from raw logits (>= 0). `ref_lse`: the
    reference's `logsumexp`, when it is compared with several models.

    With d = ref - logits and p the reference's probabilities, KL = sum p d + log sum p exp(-d), taken as
    A + log1p(B), B = sum p expm1(-d) (`mixq.core.head`'s form): no difference of two log-sum-exps (O(10)
    each, so ~1e-6 apart in float32) is formed, and a KL of 1e-9 keeps its digits. Tokens the reference
    rules out (p = 0) add the other model's mass on them to B. On the CPU the per-element work runs in numpy."""
    _check3("ref_logits", ref_logits)
    _check3("logits", logits)
    if tuple(ref_logits.shape) != tuple(logits.shape):
        raise ValueError(f"shape mismatch: ref {tuple(ref_logits.shape)} vs {tuple(logits.shape)}")
    if ref_lse is None:
        ref_lse = logsumexp(ref_logits, chunk_elements=chunk_elements)
    elif tuple(ref_lse.shape) != tuple(ref_logits.shape[:2]):
        raise ValueError(f"ref_lse shape {tuple(ref_lse.shape)} does not match logits {tuple(ref_logits.shape)}")
    return _per_position(_kl_np if numpy_on_cpu() else _kl_mx, ref_logits, logits, ref_lse,
                         chunk_elements=chunk_elements)


def _kl_np(r, q, lse) -> mx.array:
    """`kl_per_token` on one slice, in numpy."""
    shape, v = r.shape[:-1], r.shape[-1]
    r, q = (np.array(x.astype(mx.float32)).reshape(-1, v) for x in (r, q))
    lse = np.array(lse, dtype=np.float32).reshape(-1, 1)
    p = np.exp(r - lse)
    live = p > 0
    everywhere = bool(live.all())
    with np.errstate(invalid="ignore"):   # -inf - -inf where both rule a token out: zeroed below
        d = np.subtract(r, q, out=r)
    if not everywhere:
        d[~live] = 0.0
    s0 = p.sum(axis=-1)
    a = np.einsum("ij,ij->i", p, d) / s0
    np.negative(d, out=d)
    c = np.maximum(d.max(axis=-1) - SHIFT_LIMIT, 0.0)   # exp(-d - c) within float32
    if c.any():
        d -= c[:, None]
    np.expm1(d, out=d)
    b = np.einsum("ij,ij->i", p, d)
    if not everywhere:   # the model's mass where the reference has none: p exp(-d) = exp(q - lse)
        rows, cols = np.nonzero(~live)
        b += np.bincount(rows, weights=np.exp(q[rows, cols] - lse[rows, 0] - c[rows]), minlength=b.size)
    kl = np.maximum(a + c + np.log1p(b / s0), 0.0)
    return mx.array(kl.astype(np.float32).reshape(shape))


def _kl_mx(r, q, lse) -> mx.array:
    """`kl_per_token` on one slice, in mlx (off the CPU)."""
    r, q = r.astype(mx.float32), q.astype(mx.float32)
    lse = lse[..., None]
    p = mx.exp(r - lse)
    live = p > 0
    d = mx.where(live, r - q, 0.0)
    s0 = p.sum(axis=-1)
    a = (p * d).sum(axis=-1) / s0
    c = mx.maximum((-d).max(axis=-1) - SHIFT_LIMIT, 0.0)[..., None]
    b = (p * mx.expm1(-d - c)).sum(axis=-1) + mx.where(live, 0.0, mx.exp(q - lse - c)).sum(axis=-1)
    return mx.maximum(a + c[..., 0] + mx.log1p(b / s0), 0.0)


def _targets_and_mask(logits, targets, mask, shifted: bool):
    _check3("logits", logits)
    targets = mx.array(targets) if not isinstance(targets, mx.array) else targets
    if targets.ndim == 1:
        targets = targets[None]
    if mask is not None:
        mask = mx.array(mask) if not isinstance(mask, mx.array) else mask
        if mask.ndim == 1:
            mask = mask[None]
    if tuple(targets.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match logits {tuple(logits.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(targets.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match targets {tuple(targets.shape)}")
    if not shifted:
        logits = logits[:, :-1]
        targets = targets[:, 1:]
        mask = None if mask is None else mask[:, 1:]
    return logits, targets.astype(mx.int32), mask


def token_nll(logits: mx.array, targets, *, shifted: bool = False, chunk_elements: int | None = None) -> mx.array:
    """Negative log-likelihood of each target, float32: (B, L-1), or (B, L) with shifted=True."""
    logits, targets, _ = _targets_and_mask(logits, targets, None, shifted)

    def nll(lg, tg):
        return -mx.take_along_axis(log_probs(lg), tg[..., None], axis=-1)[..., 0]

    return _per_position(nll, logits, targets, chunk_elements=chunk_elements)


def _valid(values: mx.array | np.ndarray, mask) -> np.ndarray:
    v = np.asarray(values.astype(mx.float32) if isinstance(values, mx.array) else values, dtype=np.float64)
    if mask is None:
        return v.reshape(-1)
    m = np.asarray(mask).astype(bool)
    if m.shape != v.shape:
        raise ValueError(f"mask shape {m.shape} does not match values {v.shape}")
    return v[m]


def summarize(values, mask=None) -> dict:
    """mean, p50, p99, max (python floats) and n (count) over the valid positions of `values`."""
    v = _valid(values, mask)
    if v.size == 0:
        raise ValueError("summarize: no valid positions")
    return {
        "mean": float(v.mean()),
        "p50": float(np.percentile(v, 50)),
        "p99": float(np.percentile(v, 99)),
        "max": float(v.max()),
        "n": int(v.size),
    }


def perplexity(logits: mx.array, targets, mask=None, *, shifted: bool = False,
               chunk_elements: int | None = None) -> float:
    """exp(mean NLL) over valid targets. Next-token by default (see the module docstring)."""
    lg, tg, m = _targets_and_mask(logits, targets, mask, shifted)
    if lg.shape[1] == 0:
        raise ValueError("perplexity: need at least 2 positions (or shifted=True)")
    nll = token_nll(lg, tg, shifted=True, chunk_elements=chunk_elements)
    v = _valid(nll, m)
    if v.size == 0:
        raise ValueError("perplexity: no valid targets")
    return float(math.exp(v.mean()))


def top1_agreement(ref_logits: mx.array, logits: mx.array, mask=None, *,
                   chunk_elements: int | None = None) -> float:
    """Fraction of valid positions where the two models' argmax tokens agree."""
    _check3("ref_logits", ref_logits)
    _check3("logits", logits)
    if tuple(ref_logits.shape) != tuple(logits.shape):
        raise ValueError(f"shape mismatch: ref {tuple(ref_logits.shape)} vs {tuple(logits.shape)}")
    same = _per_position(lambda r, q: (mx.argmax(r, axis=-1) == mx.argmax(q, axis=-1)).astype(mx.float32),
                         ref_logits, logits, chunk_elements=chunk_elements)
    v = _valid(same, mask)
    if v.size == 0:
        raise ValueError("top1_agreement: no valid positions")
    return float(v.mean())


def compare(ref_logits: mx.array, logits: mx.array, tokens, mask=None) -> dict:
    """The standard comparison of a model against its reference on the same `tokens` (B, L).

    Returns {"kl_mean", "kl_p99", "kl_max", "top1", "ppl", "ref_ppl"}: KL(ref || model) and top-1 agreement
    over all valid positions, next-token perplexity of each model on `tokens`.
    """
    kl = summarize(kl_per_token(ref_logits, logits), mask)
    return {
        "kl_mean": kl["mean"],
        "kl_p99": kl["p99"],
        "kl_max": kl["max"],
        "top1": top1_agreement(ref_logits, logits, mask),
        "ppl": perplexity(logits, tokens, mask),
        "ref_ppl": perplexity(ref_logits, tokens, mask),
    }
