import mlx.core as mx
import numpy as np
import pytest

from mixq.quant.estimate import FisherStats
from mixq.quant.hessian import ExpertGrams


def test_expert_grams_are_each_experts_own_rows_whatever_their_order():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((300, 24)).astype(np.float32)
    ids = rng.integers(0, 6, 300).astype(np.int32)
    ids[ids == 4] = 5   # expert 4 is never routed to: its H is zero
    g = ExpertGrams(mx.array(rows).astype(mx.bfloat16), mx.array(ids), 7)
    assert g.shape == (7, 24, 24) and len(g) == 7
    r32 = np.array(mx.array(rows).astype(mx.bfloat16).astype(mx.float32))
    want = np.stack([r32[ids == e].T @ r32[ids == e] for e in range(7)])
    got = np.array(g.chunk(0, 7))
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    assert not got[4].any() and not got[6].any()
    assert np.array_equal(np.array(g[2]), got[2])
    # the rows are kept with their experts' ids (sorted together): row sums per expert are unchanged
    kept = np.array(g.rows)
    kid = np.array(g.ids)
    assert sorted(kid.tolist()) == kid.tolist()
    for e in range(7):
        assert np.allclose(kept[kid == e].sum(axis=0), r32[ids == e].sum(axis=0), atol=1e-4)


def _routed(seed: int, n_rows: int, experts: int):
    """Random routed rows (32 wide) and ids, an expert error dW (experts, 8, 32) and output moments "w"."""
    rng = np.random.default_rng(seed)
    rows = mx.array(rng.standard_normal((n_rows, 32)).astype(np.float32))
    ids = mx.array(rng.integers(0, experts, n_rows).astype(np.int32))
    dW = mx.array(rng.standard_normal((experts, 8, 32)).astype(np.float32) * 0.01)
    st = FisherStats(n_rows // 2)
    st.gd["w"] = mx.array(rng.random((experts, 8)).astype(np.float32))
    return rows, ids, dW, st, ExpertGrams(rows, ids, experts)


def test_expert_estimates_do_not_depend_on_the_rows_order():
    rows, ids, dW, st, g = _routed(1, 200, 4)
    # the per-row form equals the Gram form: sum_i G_i (dW H_e dW^T)_ii per expert
    H = np.array(g.chunk(0, 4))
    d = np.array(dW)
    counts = np.bincount(np.array(ids), minlength=4)
    ysq = np.einsum("eij,ejk,eik->ei", d, H, d)
    want = (np.array(st.gd["w"]) * ysq).sum(axis=1) / np.maximum(counts, 1)
    assert np.isclose(st.estimate("w", g, dW), want.sum() / 200, rtol=1e-4)


def test_released_map_holds_no_gram_and_still_knows_its_paths():
    """After the sweeps that round, the convert lets every Gram go (the distillation's memory is a stage of
    its own); the rounding's settings still see which tensors had one."""
    from mixq.core.errors import MixqError
    from mixq.quant.hessian import HessianMap

    m = HessianMap({"a.weight", "b.weight", "e.weight"})
    g = mx.ones((4, 4))
    m.global_["e.weight"] = g
    m.keep(0, {"a.weight": g})
    m.set_block(1, {"b.weight": g})
    assert m.kept(0) and m["b.weight"] is g
    m.release()
    assert m.kept(0) is None and not m.kept_all([0]) and m.block == {} and m.global_ == {}
    assert bool(m) and "a.weight" in m and len(m) == 3
    with pytest.raises(MixqError, match="block the sweep is not at"):
        m["b.weight"]


def test_map_keeps_every_blocks_grams_only_when_all_can_fit(nemotron_dense):
    """All or none: Grams that cannot all fit in KEEP_BYTES are not kept at all (not up to the limit and then
    dropped); preflight counts what is kept."""
    from mixq.core.anatomy import describe
    from mixq.core.modelio import load
    from mixq.quant import hessian
    from mixq.quant.calibpass import make_rounding

    g = mx.ones((4, 4))
    small, large = hessian.HessianMap({"a.weight"}), hessian.HessianMap({"a.weight"}, hessian.KEEP_BYTES + 1)
    for m in (small, large):
        m.keep(0, {"a.weight": g})
        m.keep(1, {"a.weight": g})
    assert small.kept_all([0, 1]) and small.kept(1)["a.weight"] is g
    assert large.kept(0) is None and not large.kept_all([0])
    lm = load(nemotron_dense)
    a = describe(lm.model, lm.config)
    total = sum(hessian.block_gram_bytes(a).values())
    assert total > 0 and hessian.kept_gram_bytes(a) == total
    _, H = make_rounding(a, "gptq")
    H.keep(0, {"a.weight": g})
    assert H.kept(0) is not None   # a tiny model's Grams all fit: kept for the later sweeps
    _, H = make_rounding(a, "gptq", keep_grams=False)   # the write sweep takes its own (Gram windows)
    H.keep(0, {"a.weight": g})
    assert H.kept(0) is None and not H.kept_all([0])


@pytest.mark.parametrize("cheap", [False, True])
def test_expert_estimates_made_a_few_experts_at_a_time_are_the_whole_tensors(monkeypatch, cheap):
    """Routed experts' rounding error given as a function of an expert range and formed a chunk at a time (a
    30B-A3B expert tensor's float32 error is 2.5 GB) gives the estimate of the whole dW."""
    from mixq.quant import estimate

    _, _, dW, st, g = _routed(2, 300, 5)
    whole = st.parts("w", g, dW, cheap=cheap)[0]
    asked = []

    def part(e0, e1):
        asked.append((e0, e1))
        return dW[e0:e1]

    monkeypatch.setattr(estimate, "EXPERT_CHUNK_BYTES", 2 * 4 * 8 * 32)   # two experts' error at a time
    assert st.parts("w", g, part, cheap=cheap)[0] == pytest.approx(whole, rel=1e-5)
    assert asked == [(0, 2), (2, 4), (4, 5)]
