"""GPTQ against the quantized model's own inputs (asymmetric calibration).

Symmetric GPTQ minimises ||(W - Q) X|| with X the float model's inputs to the layer. In the written model
the layer sees X~, what the layers rounded before it produce, and what counts is how close Q X~ comes to
the float layer's W X. min_Q ||W X - Q X~|| (GPTAQ, Li et al. 2025) splits exactly into a least-squares
target and plain GPTQ: with H~ = X~ X~^T and C = X X~^T, W' = W C H~^-1 is the best float weight on X~ and the
rest is orthogonal to X~'s rows, so GPTQ of W' against H~ minimises the same error; the solver is unchanged,
only its weight and H. A ridge toward W keeps W' sane where X~ has few rows: W' = (W C + l W)(H~ + l I)^-1, with
l = RIDGE x inputs / rows x mean(diag H~): as if RIDGE x inputs more rows, of the inputs' mean square in every
direction, asked W' to equal W. A regression overfits as inputs / rows grows, and a 9B's 15680-input down_proj
gets about one row an input from 64 x 256 tokens, where the demo's widest layer gets 21.
Within a block the layers are taken in the order they run (q/k/v, then o_proj; in_proj, then out_proj), each
group's X~ from a run with the groups before it rounded ("true sequential"). A group's X~ depends on the groups
before it only, so once taken it is passed in to the later groups' runs and the block's last run (`feeding`):
each computes from the last group on (llama-135M shapes: the write 188.7 -> 135.2 s, the same output).

Measured (benchmarks/gptq_inputs.py, the default convert, held-out KL against --gptq-inputs float): demo
0.836 / 0.835x at 4.53 / 5.5 bpw, demo-moe 0.901 / 0.882x, llama-135M shapes (random weights) 0.865x at 4.5
(0.890x with a fixed ridge); the target is the gain, the in-block order a part of it, and at a few rows an input
the fixed ridge lost to the float inputs where this one gains (benchmarks/gptq_inputs_variants.py, README). The routed
experts keep the float inputs' Grams (few rows per expert, and a token routed elsewhere has no float
counterpart at that expert).
"""

from __future__ import annotations

import numpy as np

from mixq.core.forward import wrapped_modules
from mixq.core.lanes import lane_iter, lane_map
from mixq.quant.hessian import block_members
from mixq.quant.qweight import round_weight

RIDGE = 2.0   # l = RIDGE x inputs / rows x mean(diag H~); measured: see README (benchmarks/gptq_inputs_variants.py)
TARGET_ROWS = 4096   # rows of W' made at a time (a 131k-row head is never float32 whole)


class OwnInputs:
    """What an asymmetric stream's rounding reads: the Grams of its own inputs where it has them (`own`), the
    shared map's (the float model's inputs) for the rest: routed experts, the embedding."""

    def __init__(self, base):
        self.base = base
        self.own: dict = {}

    @property
    def paths(self):
        return self.base.paths

    def __contains__(self, path) -> bool:
        return path in self.base

    def __getitem__(self, path: str):
        return self.own[path] if path in self.own else self.base[path]

    def __bool__(self) -> bool:
        return bool(self.base)

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def _tap_class():
    import mlx.nn as nn

    class Tap(nn.Module):
        """Passes through, keeping its last input (and logging each call's module and input)."""

        def __init__(self, inner, name: str, log: list | None):
            super().__init__()
            self.inner, self._name, self._log = inner, name, log
            self.x = None
            self.feed = None   # set: passed in for x (an earlier run's input here, the same values)

        def __call__(self, x, *args, **kwargs):
            if self.feed is not None:
                x = self.feed
            if self._log is not None:
                self._log.append((self._name, x))
            self.x = x
            return self.inner(x, *args, **kwargs)

    return Tap


def tapped(model, modules, log: list | None = None):
    """Within: `modules` (paths from the model's root) wrapped by taps; yields module path -> Tap."""
    Tap = _tap_class()
    return wrapped_modules(model, lambda m, inner: Tap(inner, m, log), modules)


def call_groups(runner, i: int, modules: list, x) -> list[list[str]]:
    """`modules` of block i in the order the block calls them, those fed one input in one group: the graph of
    one run on `x` is built, not computed."""
    return _groups(_call_log(runner, i, modules, x), modules)


def _call_log(runner, i: int, modules: list, x) -> list:
    log: list = []
    with tapped(runner.model, modules, log):
        runner.block(i, x)
    return log


def _groups(log: list, modules: list) -> list[list[str]]:
    groups, seen, last = [], set(), None
    for m, inp in log:
        if m in seen:
            continue
        if last is None or inp is not last:
            groups.append([])
        groups[-1].append(m)
        seen.add(m)
        last = inp
    return groups + [[m] for m in modules if m not in seen]   # never called: a group each, last


def block_groups(sweep, i: int, x) -> tuple[list[list[str]], bool]:
    """Block i's dense layers that GPTQ rounds (`sweep.gptq_paths`), grouped as `call_groups` (x: a batch), and
    whether each is called once a run (then an earlier run's inputs to a group can be fed to later runs)."""
    mods = sorted({m for m, experts in block_members(sweep.anatomy, i, sweep.gptq_paths).values() if experts is None})
    if not mods:
        return [], False
    log = _call_log(sweep.runner, i, mods, x[:1])
    names = [m for m, _ in log]
    return _groups(log, mods), len(names) == len(set(names))


def _rows(x):
    import mlx.core as mx

    return x.reshape(-1, x.shape[-1]).astype(mx.float32)


def capturing(fn, taps: dict, groups: list):
    """fn(x) -> [its output, then each group's input rows (float32)], from the taps on the groups' first layers:
    the float block's run keeps what the streams' Grams pair with, instead of running again for each group."""
    def run(x):
        y = fn(x)
        return [y] + [_rows(taps[g[0]].x) for g in groups]
    return run


def split(outs: list, groups: list) -> tuple[list, list]:
    """`capturing`'s per-batch results -> (outputs, per group: the batches' input rows)."""
    return [o[0] for o in outs], [[o[1 + g] for o in outs] for g in range(len(groups))]


def pair_grams(runner, i: int, module: str, xf: list, q_in: list, over: dict, item_bytes: int = 0,
               fed: dict | None = None, keep: bool = False):
    """(C = sum X X~^T, H~ = sum X~ X~^T, rows, X~ batch for batch as the layer takes it) over every batch: X
    the float block's input rows to `module` (`xf`, batch for batch), X~ the stream's (block input `q_in`, with
    `over` swapped in). `fed`: module -> its inputs from an earlier run, batch for batch, passed in (`feeding`).
    `keep`: X~ kept (else an empty list) and xf's batches let go of as they are used. Float32 on the device."""
    fed = fed or {}
    # swapped before the taps wrap the fed layers (the swap's paths are the unwrapped ones)
    with runner.swap(i, over), tapped(runner.model, [module, *(m for m in fed if m != module)]) as taps:
        tap = taps[module]

        def pair(k):
            _feed(taps, fed, k)
            runner.block(i, q_in[k])   # only what reaches the tap is computed (the graph is pruned)
            x, f = tap.x, xf[k]
            if keep:
                xf[k] = None
            c, h, n = _pair(f, _rows(x))
            return c, h, n, x

        kept: list = []

        def pairs():
            for _, (c, h, n, x) in lane_iter(pair, list(range(len(q_in))), item_bytes=item_bytes):
                if keep:
                    kept.append(x)
                yield c, h, n

        C, H, n = _sums(pairs())
        tap.x = None
    return C, H, n, kept


def _feed(taps: dict, fed: dict, k: int):
    for m, xs in fed.items():
        taps[m].feed = xs[k]


def feeding(runner, i: int, q_in: list, fed: dict, item_bytes: int = 0) -> list:
    """Block i's outputs on `q_in` (evaluated, `lane_map`) with `fed`'s inputs (module -> per batch, from the
    stream's own runs: the same values; may be empty) passed in for the recomputed ones: what only the fed layers
    read is never computed again (the rounded block's last run then costs its last group, not a forward). Inside
    `runner.swap`."""
    if not fed:
        return lane_map(lambda x: runner.block(i, x), q_in, item_bytes=item_bytes)
    with tapped(runner.model, list(fed)) as taps:
        def run(k):
            _feed(taps, fed, k)
            return runner.block(i, q_in[k])

        return lane_map(run, list(range(len(q_in))), item_bytes=item_bytes)


def _pair(xf, xq):
    """One batch's (X X~^T, X~ X~^T, rows) from its rows (row-major: X^T X~)."""
    return xf.T @ xq, xq.T @ xq, int(xq.shape[0])


def _sums(pairs):
    """(sum of the C parts, sum of the H parts, rows), evaluated as they come."""
    import mlx.core as mx

    C = H = None
    n = 0
    for c, h, k in pairs:
        C, H = (c, h) if C is None else (C + c, H + h)
        n += k
        mx.eval(C, H)
    return C, H, n


def target(w, C, H, samples: int, ridge: float = RIDGE):
    """W' = (W C + l W)(H + l I)^-1 in w's dtype, l = ridge x inputs / samples x mean(diag H) (`samples`: the
    input rows H sums): the float weight that best maps the stream's inputs to the float layer's outputs. Cholesky on the
    CPU (LAPACK, float32)."""
    import mlx.core as mx
    from scipy.linalg import cho_factor, cho_solve

    Hn = np.array(H, dtype=np.float32)
    d = Hn.shape[-1]
    lam = ridge * d / max(1, samples) * float(np.mean(np.diagonal(Hn))) + 1e-12
    Hn[np.arange(d), np.arange(d)] += lam
    fac = cho_factor(Hn, lower=False, overwrite_a=True, check_finite=False)
    rows = int(w.shape[0])
    if rows >= d:   # M = (C + l I)(H + l I)^-1 once (d x d), then W M a few rows at a time
        Ct = np.array(C, dtype=np.float32).T          # (C + l I)^T = C^T + l I
        Ct[np.arange(d), np.arange(d)] += lam
        M = mx.array(cho_solve(fac, Ct, overwrite_b=True, check_finite=False).T)
        del Ct
        out = [(w[a:a + TARGET_ROWS].astype(mx.float32) @ M).astype(w.dtype) for a in range(0, rows, TARGET_ROWS)]
    else:           # W'^T = (H + l I)^-1 (C^T W^T + l W^T): a solve with `rows` right-hand sides, no d x d copy
        wt = w.astype(mx.float32).T
        rhs = np.array(C.T @ wt + lam * wt, dtype=np.float32)
        del wt
        out = [mx.array(cho_solve(fac, rhs, overwrite_b=True, check_finite=False).T).astype(w.dtype)]
    res = mx.concatenate(out) if len(out) > 1 else out[0]
    mx.eval(res)
    return res


def round_block(sweep, i: int, s, groups: list, fx: list, q_in: list, stored: dict,
                item_bytes: int = 0, feed: bool = False) -> tuple[dict, float, dict]:
    """Stream `s`'s tensors of block i (path -> QuantizedWeight): the dense layers GPTQ rounds against the
    stream's own inputs, group by group in call order (`groups`, `block_groups`); the rest (routed experts,
    round-to-nearest formats) as usual, first. `fx`: per group, the float model's input rows batch for batch
    (`capturing`); `q_in`: the stream's block inputs, the same batches. `feed`: each group's inputs, once
    taken, are passed in to the later groups' runs instead of recomputed (a group's input depends on the
    groups before it only, rounded by then), and `fx`'s batches are let go of as used (the last stream to read
    them). Returns the tensors, the block forwards spent (a group's run stops at it: counted whole) and, with
    `feed`, module -> its inputs batch for batch (for `feeding`)."""
    import mlx.core as mx

    r, rounding = sweep.runner, s.rounding
    fmts = {p: f for p in sweep.by_layer.get(i, []) if (f := s.formats.get(p)) is not None and f.is_quantized}
    # weight path -> module path: the dense layers rounded against the stream's inputs
    own = {p: m for p, (m, experts) in block_members(sweep.anatomy, i, fmts).items()
           if experts is None and rounding.uses_gptq(p, fmts[p])}
    out = {p: round_weight(rounding, p, stored[p], f) for p, f in fmts.items() if p not in own}
    over = {p: q.full(r.compute) for p, q in out.items()}
    forwards = 0.0
    by_module = {m: p for p, m in own.items()}
    missing = set(by_module) - {m for g in groups for m in g}
    if missing:   # it would be neither rounded nor written
        raise ValueError(f"block {i}: {sorted(missing)} rounded by GPTQ but not in the block's call groups")
    fed: dict = {}
    for group, xf in zip(groups, fx):
        mine = [m for m in group if m in by_module]
        if not mine:
            continue
        C, H, n, xs = pair_grams(r, i, group[0], xf, q_in, over, item_bytes, fed, keep=feed)
        if feed:
            fed.update({m: xs for m in group})
        del xs
        forwards += len(q_in)
        targets = {by_module[m]: target(stored[by_module[m]], C, H, n) for m in mine}
        del C   # GPTQ needs H~ (and makes its factor) only
        for p, w in targets.items():
            rounding.hessians.own = {p: H}
            out[p] = round_weight(rounding, p, w, fmts[p])
            over[p] = out[p].full(r.compute)
        del targets, H
        rounding.hessians.own = {}
        mx.eval(list(over.values()))
    return out, forwards, fed


def round_head(runner, s, fmt, f_final: list, q_final: list):
    """The untied head rounded against the stream's own final normed states (`q_final`, beside the float
    model's `f_final`, batch for batch)."""
    C, H, n = _sums(_pair(_rows(a), _rows(b)) for a, b in zip(f_final, q_final))
    path = runner.head_path
    w = target(runner.head_weight(), C, H, n)
    del C
    s.rounding.hessians.own = {path: H}
    try:
        return round_weight(s.rounding, path, w, fmt)
    finally:
        s.rounding.hessians.own = {}
