"""The fast-BLAS preload: on when a library is there, same numbers as the bundled BLAS, off on request."""

import glob
import os
import subprocess
import sys

import mixq
from mixq.core import blas

PROBE = """
import json, mixq, numpy as np
import mlx.core as mx
from mixq.core import blas
mx.random.seed(0)
a = mx.random.normal((96, 80)); b = mx.random.normal((80, 72))
c = np.array(a @ b)
ref = np.array(a).astype(np.float64) @ np.array(b).astype(np.float64)
print(json.dumps({"info": blas.info(), "err": float(np.abs(c - ref).max())}))
"""


def _probe(env_extra):
    import json
    env = {**os.environ, **env_extra}
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_fast_blas_used_when_installed_and_correct():
    fast = _probe({"MIXQ_BLAS": "auto"})
    off = _probe({"MIXQ_BLAS": "off"})
    assert off["info"]["status"] == "disabled"
    assert fast["err"] < 1e-3 and off["err"] < 1e-3
    if blas._candidates():
        assert fast["info"]["status"] == "fast", fast
    else:
        assert fast["info"]["status"] == "reference" and "apt-get install" in fast["info"]["detail"]


def test_in_process_status():
    # conftest imports mixq before mlx, so the preload (if any) happened first
    assert blas.info()["status"] in ("fast", "reference", "disabled", "platform")
    if blas.info()["status"] == "fast":
        assert any("blas" in p.lower() for p in blas._loaded_blas_libraries())


NUMPY_FIRST = """
import json, ctypes
import numpy  # its wheel maps a prefixed OpenBLAS (scipy_cblas_*) that mlx cannot use
import mixq
from mixq.core import blas
print(json.dumps({"info": blas.info(), "global_sgemm": hasattr(ctypes.CDLL(None), "cblas_sgemm")}))
"""


def test_numpy_imported_first_does_not_pass_for_a_fast_blas():
    import json

    r = subprocess.run([sys.executable, "-c", NUMPY_FIRST], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "MIXQ_BLAS": "auto"})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    if blas._candidates():
        assert got["info"]["status"] == "fast" and got["info"]["library"] in blas._candidates(), got
        assert got["global_sgemm"]  # the plain symbol mlx links against now resolves to it
