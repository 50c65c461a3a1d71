"""Routed experts a segment per expert on the CPU: the same values and gradients as mlx's gather_mm."""

import mixq  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np
from mlx_lm.models.switch_layers import SwitchLinear

from mixq.core import blas
from mixq.core.experts import segmented_experts, segmented_gather_mm
from mixq.core.modelio import load


def _gather(x, w, ids):
    return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=ids, sorted_indices=True)


def test_segments_give_gather_mms_values_and_gradients():
    rng = np.random.default_rng(0)
    w = mx.array(rng.normal(size=(6, 5, 8)).astype(np.float32))
    ids = mx.array(np.sort(rng.choice([0, 1, 3, 5], size=40)).astype(np.uint32))   # experts 2 and 4 get no row
    x = mx.array(rng.normal(size=(40, 1, 8)).astype(np.float32))
    ct = mx.array(rng.normal(size=(40, 1, 5)).astype(np.float32))
    got, got_grads = mx.vjp(lambda a, b: [segmented_gather_mm(a, b, ids)], [x, w], [ct])
    ref, ref_grads = mx.vjp(lambda a, b: [_gather(a, b, ids)], [x, w], [ct])
    np.testing.assert_allclose(np.array(got[0]), np.array(ref[0]), rtol=1e-5, atol=1e-6)
    for g, r in zip(got_grads, ref_grads):
        np.testing.assert_allclose(np.array(g), np.array(r), rtol=1e-5, atol=1e-6)
    assert float(mx.abs(got_grads[1][2]).max()) == 0.0


def test_a_moe_block_runs_its_experts_by_segment_and_gets_them_back(monkeypatch):
    lm = load("demo-moe", compute_dtype=None, lazy=True)
    r = lm.runner()
    i = next(k for k, l in enumerate(r.layers) if l.block_type == "E")
    h = r.embed(mx.array(np.random.default_rng(1).integers(0, 500, (4, 64))))
    experts = [m for _, m in r.layers[i].named_modules() if type(m) is SwitchLinear]
    assert experts
    calls = []
    real = segmented_gather_mm

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr("mixq.core.experts.segmented_gather_mm", counted)
    with r.resident(i):
        seg = r.block(i, h)
        mx.eval(seg)
        monkeypatch.setattr(blas, "NUMPY_ON_CPU", False)   # the GPU's path: mlx's gather_mm
        whole = r.block(i, h)
        mx.eval(whole)
    assert len(calls) == len(experts)
    assert [m for _, m in r.layers[i].named_modules() if type(m) is SwitchLinear] == experts
    np.testing.assert_allclose(np.array(seg), np.array(whole), rtol=1e-4, atol=1e-5)


def test_nothing_is_swapped_off_the_cpu_path_or_without_float_experts(monkeypatch):
    lm = load("demo", compute_dtype=None, lazy=True)   # no experts
    layer = lm.runner().layers[0]
    before = [m for _, m in layer.named_modules()]
    with segmented_experts(layer):
        assert [m for _, m in layer.named_modules()] == before
    moe = load("demo-moe", compute_dtype=None, lazy=True).runner()
    layer = next(l for l in moe.layers if l.block_type == "E")
    monkeypatch.setattr(blas, "NUMPY_ON_CPU", False)
    before = [m for _, m in layer.named_modules()]
    with segmented_experts(layer):
        assert [m for _, m in layer.named_modules()] == before
