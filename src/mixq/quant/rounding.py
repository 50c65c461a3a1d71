"""Per tensor, how a weight is rounded, and what is kept between roundings (`Rounding`).

GPTQ (`mixq.quant.gptq`) for affine formats where a Hessian was collected, mlx's round-to-nearest
otherwise. `Rounding` keeps solved results (in memory or spilled to files) for a plan rounded again, and
the factors of the last Hessians for the formats and tensors that share them; it is shared by the threads
that solve a block's tensors side by side (`mixq.core.lanes.thread_map`).
"""

from __future__ import annotations

import math
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from mixq.core.formats import Format, applicable, dequantize, quantize_dequantize
from mixq.quant import gptq

CACHE_ENTRIES = 1 << 20    # packed results `Rounding` keeps (keep=True) ...
CACHE_BYTES = 1 << 30      # ... and their bytes in all; see `Rounding`
SPILL_BYTES = 64 << 30     # the same kept in files (`Rounding(spill=DIR)`)
FACTOR_BYTES = 64 << 20    # float32 factors kept for more than the last Hessian (tensors solved in threads)


def _fingerprint(H) -> tuple:
    """Shape and a digest of H's values, a few rows at a time (no copy of a 9B model's 1 GiB Gram)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    step = max(1, (16 << 20) // max(4 * int(H.shape[-1]), 1))
    for a in range(0, int(H.shape[0]), step):
        h.update(np.ascontiguousarray(np.asarray(H[a:a + step], dtype=np.float32)).tobytes())
    return tuple(H.shape), h.hexdigest()


class Rounding:
    """Per tensor: GPTQ for affine formats where a Hessian was collected, mlx's round-to-nearest otherwise.

    `quantized` returns the packed (weight, scales, biases) mlx arrays that the written model holds;
    `qdq` returns their float32 dequantization (the fake quant every measurement uses). Hessians are
    numpy or mx arrays, (cols, cols) or one per expert (experts, cols, cols).

    Results asked for with `keep=True` are cached, packed, while the cache has room: at most
    CACHE_ENTRIES results and CACHE_BYTES in all, first come first kept, nothing evicted. A plan that is
    evaluated again and then written in the same tensor order (calibration, held-out, write) finds its
    first tensors solved, where least-recently-used would find none once the plan outgrows the cache;
    evaluating further plans adds nothing. With `spill` (a directory) kept results go to files there instead
    of memory (SPILL_BYTES, at most half the free disk), read back when asked for: at a 9B model's widths
    the in-memory cache was a third of the convert's memory beyond its weights.
    """

    def __init__(self, hessians=None, settings: dict | None = None, clip: tuple | None = None, spill=None):
        # a dict, or mixq.quant.hessian.Hessians (computed lazily per block): path -> H
        self.hessians = hessians if hessians is not None else {}
        self._settings = dict(settings or {})
        self.clip = tuple(gptq.CLIP_GRID if clip is None else clip)   # group range shrink ratios searched
        self._cache: dict[tuple[str, str], Any] = {}   # key -> packed arrays, or the file holding them
        self._cache_bytes = 0
        self._spill, self._budget = None, CACHE_BYTES
        if spill is not None:
            self._spill = Path(spill)
            shutil.rmtree(self._spill, ignore_errors=True)   # an earlier run's files: their index is gone
            self._spill.mkdir(parents=True)
            self._budget = min(SPILL_BYTES, shutil.disk_usage(self._spill).free // 2)
        self._fell_back: dict[tuple[str, str], bool] = {}  # every slice kept round-to-nearest
        # float32 factors per slice by H (its fingerprint, or the path for per-expert Hs): the last one, or
        # the last few within FACTOR_BYTES (tensors of one block solved side by side, `core.lanes.thread_map`)
        self._factors: OrderedDict = OrderedDict()
        self._last = threading.local()   # per thread: the last path solved and its factors' key
        self._lock = threading.Lock()          # the cache and its files
        self._factor_lock = threading.Lock()   # one factorisation at a time: a second asker waits and reuses it

    def settings(self) -> dict:
        """Everything that changes the rounded values (goes into the sensitivity key)."""
        if not self.hessians:
            return {"method": "rtn"}
        clip = {} if self.clip == (1.0,) else {"clip": list(self.clip)}
        return {"method": gptq.GPTQ_VERSION, "damp": gptq.DAMP, "block": gptq.BLOCK, "outer": gptq.OUTER, **clip,
                **self._settings}

    def ready(self, path: str) -> None:
        """Evaluate `path`'s Hessian in this thread: a solve run in a worker thread (`core.lanes.thread_map`)
        cannot evaluate another thread's graphs."""
        import mlx.core as mx

        from mixq.quant.hessian import hessian_arrays

        if path in self.hessians:
            mx.eval([a for a in hessian_arrays(self.hessians[path]) if not isinstance(a, np.ndarray)])

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
            with self._lock:
                kept = key in self._cache
            if kept:
                out[str(fmt)] = self._kept(key)
            elif not self.uses_gptq(path, fmt) or not applicable(w.shape, fmt):
                raise ValueError(f"{path}: no GPTQ rounding for {fmt}")
            elif fmt not in todo:
                todo.append(fmt)
        for group in sorted({f.group_size for f in todo}):
            same = [f for f in todo if f.group_size == group]
            for fmt, (res, take_rtn) in zip(same, self._solve(path, w, same)):
                key = (path, str(fmt))
                nbytes = sum(a.nbytes for a in res)
                with self._lock:
                    self._fell_back[key] = bool(all(take_rtn))
                    if keep and len(self._cache) < CACHE_ENTRIES and self._cache_bytes + nbytes <= self._budget:
                        self._cache[key] = self._keep(res)
                        self._cache_bytes += nbytes
                out[str(fmt)] = res
        return out

    def release(self) -> None:
        """Let the factors and the kept results go: nothing is rounded again, or the Hessians are about to
        change (a tensor asked for again is solved again). Which tensors fell back to round-to-nearest is
        still known (`name_for`) until then."""
        with self._factor_lock, self._lock:
            self._factors.clear()
            self._cache.clear()
            self._cache_bytes = 0

    def fork(self, hessians, **settings) -> "Rounding":
        """The same rounding reading other Hessians (`asymmetric.OwnInputs`: a stream's own inputs); it keeps
        no results (each tensor is solved once, for the stream that owns it)."""
        out = Rounding(hessians, settings={**self._settings, **settings}, clip=self.clip)
        out._budget = 0
        return out

    def _keep(self, res: tuple):
        if self._spill is None:
            return res
        import mlx.core as mx

        f = self._spill / f"{len(self._cache)}.safetensors"
        mx.save_safetensors(str(f), dict(zip("wsb", res)))
        return f

    def _kept(self, key):
        with self._lock:
            v = self._cache[key]
        if isinstance(v, Path):
            import mlx.core as mx

            d = mx.load(str(v))
            return d["w"], d["s"], d["b"]
        return v

    def _slice_factors(self, path: str, H, slices: int) -> list:
        """One factor per slice (or one shared by all), kept for the last Hessians (every candidate format
        of a tensor shares them; a thread waits while another factors the H it needs)."""
        with self._factor_lock:
            last = getattr(self._last, "key", None)
            if getattr(self._last, "path", None) == path and last in self._factors:
                return self._factors[last]   # the same tensor again (its formats of another group size)
            if H.ndim == 2:
                key = ("H", _fingerprint(H))   # an equal Gram (q/k/v, gate/up) reuses its factors
            else:   # per-expert Hs are not fingerprinted: factored again for every new tensor
                key = ("path", path)
                self._factors.pop(key, None)
            if key not in self._factors:
                # the older factors go first where the new one would pass FACTOR_BYTES (at most one is held then)
                need = (slices if H.ndim >= 3 else 1) * int(H.shape[-1]) ** 2 * 4
                held = sum(u.nbytes for f in self._factors.values() for u in f)
                while self._factors and held + need > FACTOR_BYTES:
                    held -= sum(u.nbytes for u in self._factors.popitem(last=False)[1])
                # layers fed one input (q/k/v, gate/up) have equal Grams: factored once for all of them
                Hs = [H[e] for e in range(slices)] if H.ndim >= 3 else [H]
                self._factors[key] = [gptq._inverse_cholesky(h) for h in Hs]
            self._factors.move_to_end(key)
            self._last.path, self._last.key = path, key
            return self._factors[key]

    def _solve(self, path: str, w, fmts: list):
        *_, rows, cols = w.shape
        slices = math.prod(w.shape[:-2])
        H = self.hessians[path]
        if H.ndim >= 3:
            H = H.reshape(-1, cols, cols)
            if H.shape[0] != slices:
                raise ValueError(f"{path}: {H.shape[0]} Hessians for {slices} slices")
        return gptq.solve(w, H, self._slice_factors(path, H, slices), fmts, self.clip)

    def qdq(self, path: str, w, fmt: Format, keep: bool = False):
        """Float32 value of `w` (source dtype) after rounding to `fmt` this way."""
        if not self.uses_gptq(path, fmt):
            return quantize_dequantize(w, fmt)
        wq, s, b = self.quantized(path, w, fmt, keep=keep)
        return dequantize(wq, s, b, fmt)


RTN = Rounding()
