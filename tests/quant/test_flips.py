"""Routing flips in the sensitivity estimate: the margin cotangent, the flip cost, what the estimate records."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mixq.core import routing
from mixq.core.anatomy import describe
from mixq.core.formats import parse_candidates
from mixq.core.modelio import load
from mixq.quant.backward import backward_sweep
from mixq.quant.calibpass import Calibration, make_rounding
from mixq.quant.flips import RouterFlips
from mixq.quant.plan import candidate_items
from mixq.quant.sweep import ForwardSweep


def _tokens(n=4, length=32, seed=0):
    return mx.array(np.random.default_rng(seed).integers(1, 500, size=(n, length)).astype(np.int32))


def test_margin_cotangent_is_the_models(nemotron_moe):
    """The margin cotangent reaching the embedding output is mx.grad of sum_r sum_t xi_rt m_rt through the
    whole float32 model (the expert choices held at the float model's), and each router's margins and
    flip costs are recorded for every position."""
    lm = load(nemotron_moe, compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    r = lm.runner(retain=False)
    tokens = _tokens()
    fwd = ForwardSweep(r, a, tokens, batch_size=2).run([], keep_inputs=True, sample_key=mx.random.key(0))
    flips = RouterFlips(r, seed=5)
    res = backward_sweep(r, a, fwd, gptq_paths={t.path for t in candidate_items(a)}, flips=flips)
    assert flips.routers and flips.summary().keys() == {str(i) for i in flips.routers}
    assert all(v["positions"] == tokens.size for v in flips.summary().values())

    f32 = load(nemotron_moe)
    r32 = f32.runner()
    x = tokens[:2]

    def total(h):
        out = mx.array(0.0)
        for i in range(r32.num_blocks):
            g = routing.gate(r32, i)
            if g is not None:
                xi_n = routing.mixer_input(r32, i, h)
                s, _ = routing.selection_scores(g, xi_n)
                order = routing.ranked(g, mx.stop_gradient(s))
                out = out + (routing.margin(g, s, order) * flips.signs(i, 0, order.shape[:-1])).sum()
            h = r32.block(i, h)
        return out

    want = mx.grad(total)(f32.model.backbone.embeddings(x))
    got = res.embed_flip_grads[0]
    assert mx.abs(want).max().item() > 0
    assert (mx.abs(want - got).max() / mx.abs(want).max()).item() < 1e-4


def test_flip_cost_is_the_expected_kl_of_flips(nemotron_moe):
    lm = load(nemotron_moe, compute_dtype=None, lazy=True)
    flips = RouterFlips(lm.runner(), seed=0)
    first, last = flips.routers[0], flips.routers[-1]
    n = 4
    flips.record(first, mx.array([0.0, 0.0, 1.0, 2.0]), mx.array([1.0, 2.0, 3.0, 4.0]))
    flips.record(last, mx.array([0.0, 0.5, 0.5, 9.0]), mx.array([1.0, 1.0, 1.0, 1.0]))
    assert flips.cost(last, 1.0, n) == 0.0            # no router after the last one
    assert flips.cost(first - 1, 0.0, n) == 0.0       # no shift, no flip
    assert flips.downstream(None) == flips.routers
    # zero margins flip with probability 1/2 at any shift; the rest as Phi(-m / s), s^2 = q / (N R)
    q = 0.25 * n * 2
    s = math.sqrt(q / (n * 2))
    phi = lambda z: 0.5 * math.erfc(-z / math.sqrt(2))  # noqa: E731
    want = (0.5 * 1 + 0.5 * 2 + phi(-1 / s) * 3 + phi(-2 / s) * 4 + 0.5 + 2 * phi(-0.5 / s) + phi(-9 / s)) / n
    assert flips.cost(None, q, n) == pytest.approx(want, rel=1e-5)
    # only the routers after the tensor's block count
    s1 = math.sqrt(q / n)
    assert flips.cost(first, q, n) == pytest.approx((0.5 + 2 * phi(-0.5 / s1) + phi(-9 / s1)) / n, rel=1e-5)
    costs = [flips.cost(None, q, n) for q in (1e-4, 1e-2, 1.0, 100.0)]
    assert costs == sorted(costs) and costs[-1] < (1 + 2 + 3 + 4 + 4) / n


def test_estimate_prices_flips_upstream_of_routers_only(nemotron_moe):
    lm = load(nemotron_moe, compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    rounding, H = make_rounding(a, "gptq")
    cal = Calibration(lm.runner(), a, _tokens(n=8, length=64), parse_candidates("2:64,4:64,8:64,float"),
                      rounding=rounding, hessians=H, method="estimate", target_bpw=4.5,
                      source_dtypes=lm.source_dtypes, batch_size=4)
    doc = cal.run()
    last = max(int(k) for k in doc["router_flips"])
    seen = {"before": 0, "after": 0}
    for rec in cal.store.done.values():
        t = doc["tensors"][rec["path"]]
        if t["layer"] is None or "flips" not in rec:
            continue
        flip, est = rec["flips"], rec["estimates"]
        assert all(0 <= flip[f] <= est[f] for f in flip)
        if t["layer"] >= last:
            assert all(v == 0 for v in flip.values())
            seen["after"] += 1
        else:
            assert flip["2:64"] > flip["8:64"] > 0
            seen["before"] += 1
    assert seen["before"] and seen["after"]
    # the embedding sits before every router: its estimate is above its Fisher-only form at every format
    emb = doc["tensors"]["backbone.embeddings.weight"]
    assert all(emb["estimates"][f] > 0 for f in ("2:64", "4:64", "8:64"))
