"""Independent batches evaluated side by side on the CPU's cores (`lane_map`), and independent solves run
one thread a core (`thread_map`).

mlx runs the element-wise ops of a CPU stream on one thread (only its BLAS calls use more), and on a CPU
they are most of a forward: a llama-135M block pass over 16 x 256 tokens spends ~17 of its 25 s in silu and
softmax. `lane_map` builds each batch's graph on its own CPU stream and evaluates them together, with
OpenBLAS set to cores // lanes threads meanwhile so the cores are not oversubscribed (measured on 2 cores:
that pass 24.8 -> 16.6 s, results bit-identical). Off the CPU there is one lane and each item is evaluated
on its own, as before, so a GPU holds one batch's activations at a time. Each extra lane holds another
item's temporaries: callers give their size (`item_bytes`) and lanes are added only while the extra stays
within LANE_BYTES (at Nemotron-Nano-9B's widths a batch's MLP activations alone exceed it: one lane there).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

from mixq.core import blas

MAX_LANES = 8
LANE_BYTES = 256 << 20     # memory the extra lanes may hold beyond one item's temporaries
LANES: int | None = None   # forced lane count (tests); None: the CPU's cores, at most MAX_LANES
_streams: list = []


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def lane_count(item_bytes: int = 0) -> int:
    """Lanes for the default device: on the CPU the cores (at most MAX_LANES, or LANES), fewer where
    the extra lanes' items (`item_bytes` each) would exceed LANE_BYTES; 1 elsewhere."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return 1
    if LANES is not None:
        return max(1, LANES)
    return max(1, min(cores(), MAX_LANES, 1 + LANE_BYTES // max(1, int(item_bytes))))


def _lane_streams(n: int) -> list:
    import mlx.core as mx

    while len(_streams) < n:
        _streams.append(mx.new_stream(mx.cpu))
    return _streams[:n]


@contextmanager
def blas_share(n: int):
    """OpenBLAS at cores // n threads while n lanes compute, then as it was."""
    old = blas.set_threads(max(1, cores() // n)) if n > 1 else None
    try:
        yield
    finally:
        if old is not None:
            blas.set_threads(old)


def lane_map(fn, items, lanes: int | None = None, item_bytes: int = 0) -> list:
    """[fn(x) for x in items], evaluated: `lanes` (default `lane_count(item_bytes)`) at a time, each built
    on its own CPU stream. `fn` returns an array or a list/tuple of arrays; it must not evaluate anything itself
    (an eval inside would wait for that lane alone)."""
    return [y for _, y in lane_iter(fn, items, lanes, item_bytes)]


def lane_iter(fn, items, lanes: int | None = None, item_bytes: int = 0):
    """Yields (index, fn(item)) evaluated, a lane-wide chunk at a time: what the caller lets go of is not
    held while the next chunk computes."""
    import mlx.core as mx

    n = min(lane_count(item_bytes) if lanes is None else lanes, len(items))
    if n <= 1:
        for k, x in enumerate(items):
            y = fn(x)
            mx.eval(y)
            yield k, y
        return
    streams = _lane_streams(n)
    for s in range(0, len(items), n):
        chunk = []
        for k, x in enumerate(items[s:s + n]):
            with mx.stream(streams[k]):
                chunk.append(fn(x))
        with blas_share(n):
            mx.eval(chunk)
        for k, y in enumerate(chunk):
            yield s + k, y
        del chunk


_pools: dict = {}   # threads -> ThreadPoolExecutor, made once: its threads keep their mlx streams between calls
_inside = threading.local()   # set in a worker: a nested thread_map runs in it, in order (no pool deadlock)


def thread_map(fn, items, item_bytes: int = 0) -> list:
    """[fn(x) for x in items], on the CPU's cores one thread each (at most `lane_count(item_bytes)`), for
    work that evaluates as it goes (a rounding and its estimate), which `lane_map` cannot build as one
    graph. mlx gives each thread its own default stream (thread-safe evaluation since 0.31.2) and numpy
    releases the GIL in its loops; OpenBLAS is shared as in `lane_map`. `fn` must not touch shared state
    unguarded. Off the CPU, for one lane, or called from a worker: in order, in this thread."""
    n = min(lane_count(item_bytes), len(items))
    if n <= 1 or getattr(_inside, "on", False):
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    def run(x):
        _inside.on = True
        return fn(x)

    if n not in _pools:
        _pools[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="mixq-lane")
    with blas_share(n):
        return list(_pools[n].map(run, items))


def batch_bytes(anatomy, shape, copies: int = 4) -> int:
    """A guess at one batch's temporaries through a block: `copies` float32 arrays of its positions
    (`shape` of the block input, (batch, length, hidden)) by the block's widest layer (routed experts:
    their top-k rows)."""
    positions = 1
    for d in shape[:-1]:
        positions *= int(d)
    widest = int(shape[-1])
    for t in anatomy.tensors:
        if t.layer is not None and len(t.shape) >= 2:
            w = max(int(t.shape[-1]), int(t.shape[-2]))
            widest = max(widest, w * (anatomy.top_k if len(t.shape) == 3 else 1))
    return 4 * copies * positions * widest
