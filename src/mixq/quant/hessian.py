"""Second moments GPTQ rounds against, recorded on the device while a sweep runs a block in float.

  Linear (and lm_head)   H = sum x x^T over every input row the layer sees (float32, on the device)
  SwitchLinear experts   the routed input rows are kept for the block; expert e's H = X_e^T X_e is formed
                         when GPTQ asks for it, a few experts at a time (128 experts x 2688^2 floats would be
                         3.7 GB per tensor)
  Embedding              H = Fisher of the embedding output, E[g g^T] with g the gradient of the
                         log-likelihood of labels sampled from the model (collected by the backward sweep)
  tied embedding         both roles: trace-normalised Fisher + trace-normalised Gram of the final hidden

Inputs are recorded by swapping each layer for a thin wrapper module of our own while a block runs
(mlx-lm's code is untouched). `HessianMap` is what `Rounding` reads: the global entries (embedding, head)
plus the entries of the block a sweep is at; asking for another block's H is an error, never a silent
plain rounding.
"""

from __future__ import annotations

from contextlib import contextmanager

from mixq.core.errors import MixqError
from mixq.core.forward import wrapped_modules

FISHER_SAMPLES = 1  # label draws per calibration batch (mlx RNG keyed by the seed)
SHARED_GRAM_BYTES = 128 << 20  # layers fed the same input share its Gram up to this size


def switch_rows(x, idx):
    """(rows, expert ids) of a SwitchLinear call: x broadcast to the indices, one row per (token, expert)."""
    import mlx.core as mx

    d = x.shape[-1]
    xb = mx.broadcast_to(x, (*idx.shape, *x.shape[-2:])).reshape(-1, d)
    ib = mx.broadcast_to(idx.reshape(*idx.shape, 1), (*idx.shape, x.shape[-2])).reshape(-1)
    return xb, ib


def hessian_arrays(h) -> list:
    """The arrays an H is held as: itself, or an `ExpertGrams`' routed rows and their expert ids."""
    return [h.rows, h.ids] if isinstance(h, ExpertGrams) else [h]


class ExpertGrams:
    """Per-expert H of a SwitchLinear from its recorded routed rows; (E, d, d) formed chunk by chunk.
    The rows are kept sorted by expert, so expert e's H costs its own rows only (masking all rows for each
    expert cost experts x rows x d^2: 45 TFLOP a tensor at the 30B-A3B's 128 experts, over the convert)."""

    ndim = 3

    def __init__(self, rows, ids, experts: int):
        import mlx.core as mx
        import numpy as np

        order = mx.argsort(ids)
        self.ids = ids[order]
        self.rows = rows.astype(mx.float32)[order]
        self.experts = experts
        self.shape = (experts, rows.shape[-1], rows.shape[-1])
        counts = np.bincount(np.array(self.ids, dtype=np.int64), minlength=experts)
        self._start = [0, *np.cumsum(counts).tolist()]

    def __len__(self) -> int:
        return self.experts

    def span(self, e0: int, e1: int) -> tuple[int, int]:
        """The positions of experts e0..e1's rows in `rows` (sorted by expert): [a, b)."""
        return self._start[e0], self._start[e1]

    def chunk(self, e0: int, e1: int):
        import mlx.core as mx

        out = []
        for e in range(e0, e1):
            a, b = self._start[e], self._start[e + 1]
            x = self.rows[a:b]
            out.append(x.T @ x if b > a else mx.zeros(self.shape[1:], dtype=mx.float32))
        return mx.stack(out)

    def __getitem__(self, e: int):
        return self.chunk(e, e + 1)[0]

    def reshape(self, *shape):
        """Already (experts, d, d): GPTQ asks for that view of a per-expert H."""
        if tuple(s for s in shape if s != -1) != self.shape[-2:] and tuple(shape) != self.shape:
            raise ValueError(f"cannot view expert Grams {self.shape} as {shape}")
        return self


def _recorder_class():
    import mlx.core as mx
    import mlx.nn as nn

    class Recorder(nn.Module):
        """Passes through to the wrapped layer, accumulating the second moment of its inputs (Linear) or
        keeping its routed rows (SwitchLinear). `probe`, when set, is added to the output: the gradient
        with respect to it is the gradient with respect to the layer's output (the backward sweep)."""

        def __init__(self, inner, experts: int | None, shared: dict | None = None):
            super().__init__()
            self.inner = inner
            self._shared = shared if shared is not None else {}  # the last input's Gram, by identity
            self._experts = experts
            self._gram = None
            self._rows: list = []
            self.probe = None
            self.paused = False  # run through without recording (shape discovery)
            self.quiet = False   # probe without recording (a second cotangent through the same block)
            self.out_shape = None
            self.last_input = None

        def __call__(self, x, *args, **kwargs):
            y = self.inner(x, *args, **kwargs)
            self.out_shape = y.shape
            if self.paused:
                return y
            if self.quiet:
                return y if self.probe is None else y + self.probe
            xf = mx.stop_gradient(x).astype(mx.float32)
            self.last_input = xf
            if self._experts is None:
                if self._shared.get("x") is x:  # q/k/v, gate/up: one input, one Gram
                    g = self._shared["g"]
                else:
                    rows = xf.reshape(-1, x.shape[-1])
                    g = rows.T @ rows
                    self._shared.clear()
                    if 4 * x.shape[-1] ** 2 <= SHARED_GRAM_BYTES:  # held until the next input
                        self._shared.update(x=x, g=g)
                self._gram = g if self._gram is None else self._gram + g
            else:
                idx = args[0] if args else kwargs["indices"]
                self.last_indices = mx.stop_gradient(idx)
                self._rows.append(switch_rows(xf, self.last_indices))
            if self.probe is not None:
                y = y + self.probe
            return y

        @property
        def routed(self) -> bool:
            """A SwitchLinear's: routed rows kept per expert, not a Gram."""
            return self._experts is not None

        def hessian(self):
            import mlx.core as mx

            if self._experts is None:
                return self._gram
            if not self._rows:
                return None
            rows = mx.concatenate([r for r, _ in self._rows])
            ids = mx.concatenate([i for _, i in self._rows])
            return ExpertGrams(rows, ids, self._experts)

    return Recorder


@contextmanager
def recording(model, members: dict):
    """Within: the modules of `members` (weight path -> (module path, experts or None)) wrapped by
    recorders; yields path -> Recorder. Modules are put back on exit."""
    Recorder = _recorder_class()
    experts = {m: e for m, e in members.values()}
    shared: dict = {}
    try:
        with wrapped_modules(model, lambda m, inner: Recorder(inner, experts[m], shared), experts) as by_module:
            yield {p: by_module[m] for p, (m, _) in members.items()}
    finally:
        shared.clear()


KEEP_BYTES = 1 << 30  # block Grams kept between sweeps (so later sweeps need not run the float model)


def block_gram_bytes(anatomy) -> dict:
    """Layer -> bytes of the float32 input Grams its Linear tensors hold (in^2 each; a SwitchLinear's routed
    rows depend on the tokens and are not counted: a lower bound for a block with experts)."""
    out: dict = {}
    for t in anatomy.tensors:
        if t.layer is None or t.module_type not in ("Linear", "SwitchLinear") or not t.path.endswith(".weight"):
            continue
        out[t.layer] = out.get(t.layer, 0) + (4 * t.shape[-1] ** 2 if t.module_type == "Linear" else 0)
    return out


def kept_gram_bytes(anatomy) -> int:
    """At most what `HessianMap` keeps for the later sweeps: every block's Grams where they fit in KEEP_BYTES,
    else none (it does not start keeping what it would have to drop). Experts' routed rows are not sized
    here: with experts, up to KEEP_BYTES."""
    total = sum(block_gram_bytes(anatomy).values())
    if total > KEEP_BYTES:
        return 0
    return KEEP_BYTES if any(t.module_type == "SwitchLinear" for t in anatomy.tensors) else total


class HessianMap:
    """path -> H for every tensor GPTQ can round: global entries (embedding, head) always, block entries
    for the block a sweep is at (`set_block`). Block entries are also kept for later sweeps (`keep`)
    while they fit in KEEP_BYTES; a sweep finds them with `kept(i)`. `expected_bytes` (every block's, at
    least): past KEEP_BYTES nothing is kept from the start, instead of up to KEEP_BYTES that would be dropped
    when the next block does not fit (a later sweep needs every block's). `keep=False`: nothing is kept (the
    sweep that rounds takes its own Grams, over more windows)."""

    def __init__(self, gptq_paths, expected_bytes: int = 0, keep: bool = True):
        self.paths = set(gptq_paths)
        self.global_: dict = {}
        self.block: dict = {}
        self.block_index: int | None = None
        self._kept: dict = {}
        self._kept_bytes = 0
        self._full = not keep or expected_bytes > KEEP_BYTES

    def keep(self, index: int, entries: dict) -> None:
        nbytes = sum(int(a.nbytes) for h in entries.values() for a in hessian_arrays(h))
        if self._full or self._kept_bytes + nbytes > KEEP_BYTES:
            self._full = True  # all or nothing past this point: a sweep needs every block's
            self._kept.clear()
            return
        self._kept[index] = dict(entries)
        self._kept_bytes += nbytes

    def kept(self, index: int) -> dict | None:
        return self._kept.get(index)

    def kept_all(self, blocks) -> bool:
        return not self._full and all(i in self._kept for i in blocks)

    def set_block(self, index: int | None, entries: dict) -> None:
        self.block_index, self.block = index, dict(entries)

    def release(self) -> None:
        """Let every Gram go (the sweeps that round are done): which tensors had one is still known."""
        self.global_, self.block, self.block_index = {}, {}, None
        self._kept, self._kept_bytes, self._full = {}, 0, True

    def __contains__(self, path) -> bool:
        return path in self.paths

    def __getitem__(self, path: str):
        if path in self.global_:
            return self.global_[path]
        if path in self.block:
            return self.block[path]
        if path in self.paths:
            raise MixqError(f"{path}: its Hessian belongs to a block the sweep is not at (block {self.block_index})")
        raise KeyError(path)

    def __bool__(self) -> bool:
        return bool(self.paths)

    def __iter__(self):
        return iter(sorted(self.paths))

    def __len__(self) -> int:
        return len(self.paths)


def block_members(anatomy, layer: int, paths) -> dict:
    """weight path -> (module path, experts or None) for the Linear/SwitchLinear tensors of `layer`."""
    out = {}
    for t in anatomy.tensors:
        if t.layer == layer and t.path in paths and t.module_type in ("Linear", "SwitchLinear"):
            out[t.path] = (t.module, t.shape[0] if t.module_type == "SwitchLinear" else None)
    return out


def normalised_sum(*mats):
    """Sum of trace-normalised matrices (the tied embedding's two roles weigh the same)."""
    import mlx.core as mx

    total = None
    for m in mats:
        if m is None:
            continue
        t = mx.maximum(mx.trace(m), 1e-30)
        total = m / t if total is None else total + m / t
    return total
