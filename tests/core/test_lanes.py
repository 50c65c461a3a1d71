"""Lanes: independent batches evaluated side by side on CPU streams give what one lane gives, in order,
with OpenBLAS's threads shared out meanwhile and put back after."""

import mlx.core as mx
import numpy as np
import pytest

from mixq.core import blas, lanes
from mixq.core.anatomy import describe
from mixq.core.formats import parse_candidates
from mixq.core.modelio import load
from mixq.quant.calibpass import Calibration, make_rounding


def test_lane_map_keeps_order_and_values():
    xs = [mx.random.normal((64, 48), key=mx.random.key(k)) for k in range(5)]
    w = mx.random.normal((48, 40), key=mx.random.key(9))

    def fn(x):
        return mx.softmax(x @ w, axis=-1) * mx.sigmoid(x.sum())

    want = [np.array(fn(x)) for x in xs]
    for n in (1, 2, 3):
        got = lanes.lane_map(fn, xs, lanes=n)
        assert len(got) == len(xs)
        for a, b in zip(got, want):
            assert np.allclose(np.array(a), b, rtol=1e-6, atol=1e-7)
    assert [k for k, _ in lanes.lane_iter(fn, xs, lanes=2)] == list(range(5))


def test_thread_map_keeps_order_and_values_and_uses_the_cores(monkeypatch):
    import threading

    w = mx.random.normal((48, 40), key=mx.random.key(9))
    xs = [mx.random.normal((64, 48), key=mx.random.key(k)) for k in range(5)]
    mx.eval(w, xs)   # inputs made here and evaluated: the workers build their own graphs on them

    def fn(x):   # evaluates as it goes, as a rounding and its estimate do
        y = mx.softmax(x @ w, axis=-1)
        return float((y * y).sum().item()), threading.current_thread().name

    want = [float((mx.softmax(x @ w, axis=-1) ** 2).sum().item()) for x in xs]
    monkeypatch.setattr(lanes, "LANES", 1)
    one = lanes.thread_map(fn, xs)
    assert [v for v, _ in one] == pytest.approx(want, rel=1e-6)
    assert {name for _, name in one} == {threading.current_thread().name}   # one lane: here, in order
    monkeypatch.setattr(lanes, "LANES", 2)
    two = lanes.thread_map(fn, xs)
    assert [v for v, _ in two] == pytest.approx(want, rel=1e-6)
    if mx.default_device() == mx.cpu:
        assert all(name.startswith("mixq-lane") for _, name in two)
    monkeypatch.setattr(lanes, "LANES", None)
    monkeypatch.setattr(lanes, "cores", lambda: 2)
    big = lanes.thread_map(fn, xs, item_bytes=lanes.LANE_BYTES + 1)   # a second one would exceed the bound
    assert {name for _, name in big} == {threading.current_thread().name}


def test_blas_threads_shared_then_restored():
    before = blas.threads()
    with lanes.blas_share(2):
        inside = blas.threads()
    assert blas.threads() == before
    if before is None:   # not OpenBLAS (reference BLAS or MIXQ_BLAS=off): nothing to share
        assert inside is None
    else:
        assert inside == max(1, lanes.cores() // 2)


def test_one_lane_off_the_cpu(monkeypatch):
    monkeypatch.setattr(lanes, "LANES", 4)
    assert lanes.lane_count() == (4 if mx.default_device() == mx.cpu else 1)


def _calibrate(path, n_lanes, monkeypatch):
    monkeypatch.setattr(lanes, "LANES", n_lanes)
    lm = load(path, compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    rounding, H = make_rounding(a, "gptq")
    tokens = mx.array(np.random.default_rng(0).integers(1, 500, size=(6, 48)).astype(np.int32))
    cal = Calibration(lm.runner(), a, tokens, parse_candidates("3:64,4:64,8:64,float"), rounding=rounding,
                      hessians=H, method="estimate", target_bpw=4.5, source_dtypes=lm.source_dtypes, batch_size=2)
    return cal.run()


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="lanes are a CPU path")
def test_calibration_with_lanes_equals_one_lane(nemotron_moe, monkeypatch):
    """Forward, backward (per-batch recorder inputs put back for the estimates) and the exact subset: the
    same numbers with three batches on two lanes as one at a time."""
    one = _calibrate(nemotron_moe, 1, monkeypatch)
    two = _calibrate(nemotron_moe, 2, monkeypatch)
    assert one["tensors"].keys() == two["tensors"].keys()
    for p, e in one["tensors"].items():
        for f, v in e["estimates"].items():
            assert two["tensors"][p]["estimates"][f] == pytest.approx(v, rel=1e-4, abs=1e-9), (p, f)
    exact = [(x["path"], x["format"], x["exact"]) for x in one["calibration"]["points"]]
    assert exact and exact == [(x["path"], x["format"], pytest.approx(x["exact"], rel=1e-4, abs=1e-9))
                               for x in two["calibration"]["points"]]


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="lanes are a CPU path")
def test_lanes_are_bounded_by_the_memory_they_add(monkeypatch, nemotron_moe):
    monkeypatch.setattr(lanes, "cores", lambda: 4)
    assert lanes.lane_count(0) == 4
    assert lanes.lane_count(lanes.LANE_BYTES // 2) == 3     # two extra items fit
    assert lanes.lane_count(lanes.LANE_BYTES + 1) == 1      # not even one
    lm = load(nemotron_moe, compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    assert a.top_k == lm.config["num_experts_per_tok"] > 1
    widest = max(max(t.shape[-1], t.shape[-2]) * (a.top_k if len(t.shape) == 3 else 1)
                 for t in a.tensors if t.layer is not None and len(t.shape) >= 2)
    assert lanes.batch_bytes(a, (2, 10, 64), copies=3) == 4 * 3 * 20 * max(widest, 64)
