"""Fast BLAS for MLX on Linux CPUs.

The `mlx[cpu]` wheel bundles reference BLAS (fp32 matmul ~7 GFLOP/s on this project's machines).
Loading an optimized `libblas.so.3` (Debian's OpenBLAS) with RTLD_GLOBAL *before* mlx is imported makes
mlx's cblas_* symbols resolve to it (~220 GFLOP/s, same results). This module must not import mlx.

Control with MIXQ_BLAS: unset/"auto" (find one), "off" (keep the bundled one), or a library path.
Install on Debian/Ubuntu: `apt-get install libopenblas0-pthread`.

`numpy_on_cpu()`: the one switch for per-element work that mixq does in numpy while mlx computes on the
CPU, where mlx's element-wise ops cost several times numpy's (KL statistics, fp4 rounding, GPTQ's loop).
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import sys

INSTALL_HINT = "apt-get install libopenblas0-pthread  (Debian/Ubuntu)"

_CANDIDATE_GLOBS = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas*.so.0",
    "/usr/lib/libopenblas.so.0",
)

_state: dict = {"status": "not-tried", "library": None, "detail": ""}
NUMPY_ON_CPU = True   # tests turn it off to run the mlx paths a GPU takes


def numpy_on_cpu() -> bool:
    """Whether per-element work goes to numpy: mlx computes on the CPU (and the switch is on)."""
    import mlx.core as mx

    return NUMPY_ON_CPU and mx.default_device() == mx.cpu


def _candidates() -> list[str]:
    arch = platform.machine()
    found: list[str] = []
    for pattern in _CANDIDATE_GLOBS:
        found.extend(sorted(glob.glob(pattern.format(arch=arch))))
    return found


def _loaded_blas_libraries() -> list[str]:
    """Shared objects mapped into this process whose name says BLAS (Linux only)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {line.split()[-1] for line in f if "blas" in line.lower() and "/" in line}
    except OSError:
        return []
    return sorted(paths)


def enable() -> dict:
    """Load an optimized BLAS before mlx, once per process. Returns `info()`."""
    if _state["status"] != "not-tried":
        return info()
    choice = os.environ.get("MIXQ_BLAS", "auto").strip() or "auto"
    if sys.platform != "linux":
        _state.update(status="platform", detail="not Linux: mlx uses the platform's own BLAS (Accelerate/Metal)")
        return info()
    if choice == "off":
        _state.update(status="disabled", detail="MIXQ_BLAS=off")
        return info()
    # a BLAS counts as loaded only if its plain cblas_sgemm is in the global namespace (LD_PRELOAD, or loaded
    # RTLD_GLOBAL): numpy's bundled OpenBLAS exports prefixed symbols only, and mlx cannot use it
    global_sgemm = hasattr(ctypes.CDLL(None), "cblas_sgemm")
    already = [p for p in _loaded_blas_libraries() if "openblas" in p.lower() or "mkl" in p.lower()]
    if already and global_sgemm:
        _state.update(status="fast", library=already[0], detail="already loaded (LD_PRELOAD or earlier import)")
        return info()
    if "mlx.core" in sys.modules:
        _state.update(status="too-late", detail="mlx was imported before mixq; import mixq first or set LD_PRELOAD")
        return info()
    paths = [choice] if choice != "auto" else _candidates()
    for path in paths:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            _state["detail"] = f"could not load {path}: {e}"
            continue
        _state.update(status="fast", library=path, detail="loaded before mlx")
        return info()
    _state.update(status="reference", detail=_state["detail"] or f"no optimized BLAS found; install: {INSTALL_HINT}")
    return info()


def info() -> dict:
    """What BLAS this process uses: status is fast / reference / disabled / platform / too-late."""
    return dict(_state)


def _openblas():
    """The loaded OpenBLAS's thread controls, or None (reference BLAS, another platform, MIXQ_BLAS=off)."""
    if _state["status"] != "fast":
        return None
    try:
        lib = ctypes.CDLL(None)
        return lib if hasattr(lib, "openblas_set_num_threads") and hasattr(lib, "openblas_get_num_threads") \
            else None
    except OSError:
        return None


def threads() -> int | None:
    """OpenBLAS's thread count (None when it is not the BLAS in use)."""
    lib = _openblas()
    return int(lib.openblas_get_num_threads()) if lib is not None else None


def set_threads(n: int) -> int | None:
    """Set OpenBLAS's thread count; returns the previous one (None, and nothing done, without OpenBLAS)."""
    lib = _openblas()
    if lib is None:
        return None
    old = int(lib.openblas_get_num_threads())
    lib.openblas_set_num_threads(ctypes.c_int(max(1, int(n))))
    return old
