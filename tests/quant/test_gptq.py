"""GPTQ rounding: mlx's exact packing, lower output error than round-to-nearest, Hessians from real layers."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mixq.core.anatomy import describe
from mixq.core.formats import AFFINE_BITS, AFFINE_GROUPS, Format, quantize_dequantize
from mixq.core.forward import BlockRunner
from mixq.core.modelio import load
from mixq.core.errors import MixqError
from mixq.core import blas
from mixq.quant import gptq, rounding
from mixq.quant.gptq import DAMP, gptq_2d, pack
from mixq.quant.rounding import Rounding


@pytest.mark.parametrize("bits", AFFINE_BITS)
@pytest.mark.parametrize("group", AFFINE_GROUPS)
def test_pack_is_bit_identical_to_mlx(bits, group):
    # integer weights q - (2^bits - 1) with every group spanning the full range: mlx quantizes them with
    # scale 1 and bias -(2^bits - 1), so its packed words must be ours bit for bit
    rng = np.random.default_rng(bits * 1000 + group)
    q = rng.integers(0, 2 ** bits, size=(6, 256))
    q[:, ::group], q[:, 1::group] = 0, 2 ** bits - 1
    wq, s, b = mx.quantize(mx.array((q - (2 ** bits - 1)).astype(np.float32)), group_size=group, bits=bits)
    assert np.all(np.array(s) == 1) and np.all(np.array(b) == -(2 ** bits - 1))
    assert np.array_equal(pack(q, bits), np.array(wq))
    ones, zeros = mx.ones(s.shape), mx.zeros(b.shape)
    back = mx.dequantize(mx.array(pack(q, bits)), ones, zeros, group_size=group, bits=bits)
    assert np.array_equal(np.array(back), q.astype(np.float32))


def _problem(rows=48, cols=128, n=1024, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols)) * 0.05
    mix = rng.standard_normal((cols, cols)) * 0.3 + np.eye(cols)
    X = rng.standard_normal((n, cols)) @ mix * rng.uniform(0.1, 3.0, cols)  # correlated, uneven channels
    return W, X


def _deq(q, S, B, group):
    return np.repeat(S, group, 1) * q + np.repeat(B, group, 1)


@pytest.mark.parametrize("bits,group", [(3, 64), (4, 64), (4, 32), (6, 32), (8, 128)])
def test_gptq_beats_round_to_nearest_on_output_error(bits, group):
    W, X = _problem()
    q, S, B = gptq_2d(W, X.T @ X, bits, group, "bfloat16")
    assert q.min() >= 0 and q.max() <= 2 ** bits - 1
    # scales and biases are bf16 values, as they will be stored
    assert np.array_equal(S, np.array(mx.array(S.astype(np.float32)).astype(mx.bfloat16).astype(mx.float32)))
    rtn = np.array(quantize_dequantize(mx.array(W.astype(np.float32)).astype(mx.bfloat16),
                                       Format.affine(bits, group)), dtype=np.float64)
    err_gptq = np.linalg.norm(X @ (W - _deq(q, S, B, group)).T)
    err_rtn = np.linalg.norm(X @ (W - rtn).T)
    assert err_gptq < 0.8 * err_rtn


@pytest.mark.parametrize("bits", [2, 4])
def test_rounding_is_never_worse_than_round_to_nearest(bits):
    W, X = _problem(seed=3)
    H = X.T @ X
    w = mx.array(W.astype(np.float32)).astype(mx.bfloat16)
    fmt = Format.affine(bits, 128)
    ours = np.array(Rounding({"w": H}).qdq("w", w, fmt), dtype=np.float64)
    rtn = np.array(quantize_dequantize(w, fmt), dtype=np.float64)
    Wb = np.array(w.astype(mx.float32), dtype=np.float64)
    err = lambda Q: np.einsum("ij,jk,ik->", Wb - Q, H, Wb - Q)  # noqa: E731
    assert err(ours) <= err(rtn) * (1 + 1e-9)


@pytest.mark.parametrize("seed,group,kept", [(0, 128, [False, True, True, True]), (1, 32, [True] * 4)])
@pytest.mark.parametrize("workset", [None, 1])
def test_slices_where_round_to_nearest_is_better_keep_it_exactly(seed, group, kept, workset, monkeypatch):
    # 2 bits, few calibration rows, heavy-tailed channels, outlier inputs: GPTQ's updates widen the group
    # ranges and lose to round-to-nearest on some experts (by 3% to 3x here, far above float32 noise)
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((4, 48, 128)).astype(np.float32) * 0.05
    W[..., rng.integers(0, 128, 3)] *= 8
    X = rng.standard_normal((64, 128)) * rng.lognormal(0, 2, 128)
    w, fmt = mx.array(W).astype(mx.bfloat16), Format.affine(2, group)
    if workset:   # 32-row steps: round-to-nearest is re-made per step for the experts that keep it
        monkeypatch.setattr(gptq, "WORKSET_BYTES", workset)
    r = Rounding({"w": X.T @ X}, clip=(1.0,))   # the range search would win on every expert here
    out = r.quantized("w", w, fmt)
    ref = mx.quantize(w, group_size=group, bits=2)
    assert [all(mx.array_equal(a[e], b[e]).item() for a, b in zip(out, ref)) for e in range(4)] == kept
    assert r.name_for("w", fmt) == ("rtn" if all(kept) else "gptq")


@pytest.mark.parametrize("workset", [None, 1])
def test_the_check_against_round_to_nearest_reads_every_kth_row(workset, monkeypatch):
    # k = rows // CHECK_ROWS; the sampled rows are the slice's rows 0, k, 2k, ... also across row chunks
    W = np.random.default_rng(0).standard_normal((2, 48, 128)).astype(np.float32)
    X = np.random.default_rng(1).standard_normal((256, 128))
    monkeypatch.setattr(gptq, "CHECK_ROWS", 16)   # 48 rows: every 3rd
    if workset:   # 32-row steps: the second starts at row 32, not a multiple of 3
        monkeypatch.setattr(gptq, "WORKSET_BYTES", workset)
    from mixq.core import lanes

    monkeypatch.setattr(lanes, "LANES", 1)   # the steps in order (the spy records them as called)
    seen = []
    check = gptq._excess_error

    def spy(Wsrc, g, r, H, kw):
        seen.append(np.array(Wsrc.astype(mx.float32)))
        assert all(a.shape[:2] == Wsrc.shape[:2] for a in (*g, *r))
        return check(Wsrc, g, r, H, kw)

    monkeypatch.setattr(gptq, "_excess_error", spy)
    Rounding({"w": X.T @ X}).quantized("w", mx.array(W), Format.affine(4, 64))
    if workset:
        got = np.stack([np.concatenate(seen[2 * e:2 * e + 2], axis=1)[0] for e in range(2)])
    else:
        (got,) = seen
    assert np.array_equal(got, W[:, ::3])


@pytest.mark.parametrize("group", [32, 128])
def test_outer_blocks_round_as_updating_every_later_column_each_block(group, monkeypatch):
    # 640 columns: outer blocks of 256, 256 and 128; with OUTER = BLOCK the outer block is the group (32: every
    # block updates all later columns, as before outer blocks; 128: four blocks a product)
    W, X = _problem(rows=64, cols=640, seed=6)
    U = gptq._inverse_cholesky((X.T @ X).astype(np.float32))[None]
    Wm = mx.array(W.astype(np.float32))[None]
    got = {}
    for outer in (gptq.BLOCK, 256):
        monkeypatch.setattr(gptq, "OUTER", outer)
        got[outer] = [np.array(a) for a in gptq._gptq(Wm, U, 4, group, "float32")]
    (qa, sa, ba), (qb, sb, bb) = got[gptq.BLOCK], got[256]
    assert (qa != qb).mean() < 1e-3   # float32 sums in another order: a rare tie goes the other way
    deq = [(q.reshape(64, -1, group) * s[..., None] + b[..., None]).reshape(64, 640)
           for q, s, b in ((qa[0], sa[0], ba[0]), (qb[0], sb[0], bb[0]))]
    H = X.T @ X
    e = [np.einsum("ij,jk,ik->", W - d, H, W - d) for d in deq]
    assert abs(e[1] - e[0]) <= 1e-4 * e[0]


def test_gptq_with_no_data_is_plain_rounding():
    W, _ = _problem(cols=64)
    q, S, B = gptq_2d(W, np.zeros((64, 64)), 4, 64, "float32", clip=(1.0,))
    lo, hi = W.min(1), W.max(1)
    assert np.abs(_deq(q, S, B, 64) - W).max() <= ((hi - lo) / 15).max() / 2 + 1e-6
    # with the range search, no data means the least squared weight error per row among the shrinks
    q, S, B = gptq_2d(W, np.zeros((64, 64)), 4, 64, "float32")
    err = ((_deq(q, S, B, 64) - W) ** 2).sum(1)
    for p in gptq.CLIP_GRID:
        qp, Sp, Bp = gptq_2d(W, np.zeros((64, 64)), 4, 64, "float32", clip=(p,))
        assert (err <= ((_deq(qp, Sp, Bp, 64) - W) ** 2).sum(1) * (1 + 1e-5)).all()


def test_group_range_search_takes_the_cheapest_shrink_per_row():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, 64)).astype(np.float32)
    d = rng.uniform(0.5, 2.0, (1, 1, 64)).astype(np.float32)
    maxq = mx.array(15.0)
    s, b = gptq._group_scale(mx.array(x), mx.array(d), maxq, mx.float32, 1e-30, gptq.CLIP_GRID)

    def cost(s, b):
        s, b = np.array(s)[..., None], np.array(b)[..., None]
        q = np.clip(np.round((x - b) / s), 0, 15)
        return (((x - (s * q + b)) / d) ** 2).sum(-1)

    each = [cost(*gptq._group_scale(mx.array(x), mx.array(d), maxq, mx.float32, 1e-30, (p,))) for p in gptq.CLIP_GRID]
    assert np.allclose(cost(s, b), np.min(each, axis=0), rtol=1e-5)
    assert cost(s, b).sum() < 0.99 * each[0].sum()   # some rows took a shrunk range, and gained by it


def test_rounding_arrays_match_mlx_layers_and_switch_experts():
    rng = np.random.default_rng(1)
    W3 = mx.array(rng.standard_normal((3, 32, 128)).astype(np.float32) * 0.05).astype(mx.bfloat16)
    H3 = np.stack([np.eye(128) * (e + 1) for e in range(3)])
    r = Rounding({"sw.weight": H3})
    fmt = Format.affine(4, 64)
    wq, s, b = r.quantized("sw.weight", W3, fmt)
    ref = mx.quantize(W3, group_size=64, bits=4)
    assert [a.shape for a in (wq, s, b)] == [a.shape for a in ref]
    assert wq.dtype == mx.uint32 and s.dtype == b.dtype == mx.bfloat16
    deq = r.qdq("sw.weight", W3, fmt)
    assert deq.dtype == mx.float32 and deq.shape == W3.shape
    assert mx.allclose(deq, mx.dequantize(wq, s, b, group_size=64, bits=4, dtype=mx.float32)).item()
    # microscaled formats and tensors without a Hessian fall back to mlx's own rounding
    for path, f in (("sw.weight", Format("mxfp4")), ("other.weight", fmt)):
        assert not r.uses_gptq(path, f)
        assert mx.array_equal(r.qdq(path, W3, f), quantize_dequantize(W3, f)).item()
    assert r.name_for("sw.weight", fmt) == "gptq" and r.name_for("sw.weight", Format("float")) == "float"


def test_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((200, 48)) * rng.uniform(0.2, 2.0, 48)
    H = X.T @ X
    H[7, :] = H[:, 7] = 0.0   # a dead input: no coupling, 1 on the diagonal, as numpy float64 did it
    live = np.arange(48) != 7
    ref = H.copy()
    ref[7, 7] = 1.0
    ref[np.diag_indices(48)] += DAMP * np.diag(H)[live].mean()
    U = np.array(gptq._inverse_cholesky(H), dtype=np.float64)
    want = np.linalg.cholesky(np.linalg.inv(ref)).T
    assert np.array_equal(U, np.triu(U)) and np.abs(U - want).max() < 1e-4 * np.abs(want).max()
    # numerically indefinite (a negative direction past the damping): the next damping step is used
    Q, _ = np.linalg.qr(rng.standard_normal((48, 48)))   # eigenvectors spread over every input
    vals = rng.uniform(1.0, 2.0, 48)
    vals[0] = -0.05
    Hn = (Q * vals) @ Q.T
    damped = Hn + DAMP * np.mean(np.diag(Hn)) * np.eye(48)
    assert np.diag(Hn).min() > 0 and np.linalg.eigvalsh(damped).min() < 0
    damped += 0.1 * np.mean(np.diag(damped)) * np.eye(48)
    assert np.linalg.eigvalsh(damped).min() > 0
    U = np.array(gptq._inverse_cholesky(Hn), dtype=np.float64)
    want = np.linalg.cholesky(np.linalg.inv(damped)).T
    assert np.abs(U - want).max() < 1e-4 * np.abs(want).max()


def _experts(seed=2, n=3, rows=48, cols=128):
    rng = np.random.default_rng(seed)
    W3 = mx.array(rng.standard_normal((n, rows, cols)).astype(np.float32) * 0.05).astype(mx.bfloat16)
    H3 = np.stack([_problem(rows, cols, 512, seed + e)[1] for e in range(n)])
    return W3, np.stack([x.T @ x for x in H3]).astype(np.float32)


def test_hessian_types_shared_hessians_and_row_chunks_give_the_same_rounding(monkeypatch):
    W3, H3 = _experts()
    fmt = Format.affine(3, 64)
    ref = Rounding({"w": H3}).quantized("w", W3, fmt)
    # numpy or mx Hessians: the same computation
    assert all(mx.array_equal(a, b).item() for a, b in zip(ref, Rounding({"w": mx.array(H3)}).quantized("w", W3, fmt)))

    def close(a, b, H):
        """Same codes nearly everywhere and the same output error (summation order may differ)."""
        codes = [np.array(mx.dequantize(o[0], mx.ones(o[1].shape), mx.zeros(o[2].shape), group_size=64, bits=3))
                 for o in (a, b)]
        deq = [np.array(mx.dequantize(*o, group_size=64, bits=3, dtype=mx.float32), dtype=np.float64) for o in (a, b)]
        W = np.array(W3.astype(mx.float32), dtype=np.float64)
        err = [np.einsum("eij,ejk,eik->", W - d, H.astype(np.float64), W - d) for d in deq]
        return np.mean(codes[0] == codes[1]) > 0.99 and abs(err[1] - err[0]) < 1e-3 * err[0]

    # one H for every expert, given once, is the same as that H given per expert
    per = np.stack([H3[1]] * 3)
    shared = Rounding({"w": H3[1]}).quantized("w", W3, fmt)
    assert close(shared, Rounding({"w": per}).quantized("w", W3, fmt), per)
    assert not close(shared, ref, H3)   # (which is not the same as three different ones)
    # rows are independent given H: a tiny working set (32-row steps, one expert each) changes nothing
    monkeypatch.setattr(gptq, "WORKSET_BYTES", 1)
    assert list(gptq._steps(3, 48, 128, True))[:3] == [(0, 1, 0, 32), (0, 1, 32, 48), (1, 2, 0, 32)]
    assert close(ref, Rounding({"w": H3}).quantized("w", W3, fmt), H3)
    with pytest.raises(ValueError, match="2 Hessians for 3 slices"):
        Rounding({"w": H3[:2]}).quantized("w", W3, fmt)


@pytest.mark.parametrize("shared", [False, True])
def test_a_tensors_steps_solved_side_by_side_equal_one_at_a_time(shared, monkeypatch):
    from mixq.core import lanes

    W3, H3 = _experts()
    H = mx.array(H3[1]) if shared else mx.array(H3)
    fmts = [Format.affine(3, 64), Format.affine(4, 64)]
    monkeypatch.setattr(gptq, "WORKSET_BYTES", 1)   # 32-row steps: six of them
    got = {}
    for n in (1, 2):
        monkeypatch.setattr(lanes, "LANES", n)
        got[n] = Rounding({"w": H}).quantized_many("w", W3, fmts, keep=False)
    for f in fmts:
        assert all(mx.array_equal(a, b).item() for a, b in zip(got[1][str(f)], got[2][str(f)]))


def test_kept_results_are_bounded_and_factors_follow_the_path(monkeypatch):
    W3, H3 = _experts()
    r = Rounding({"a": H3, "b": H3[0], "c": H3[1]})
    fmts = [Format.affine(4, 64), Format.affine(3, 64), Format.affine(2, 64)]
    monkeypatch.setattr(rounding, "CACHE_ENTRIES", 2)
    first = [r.quantized("a", W3, f) for f in fmts]
    assert list(r._factors) == [("path", "a")] and len(r._factors["path", "a"]) == 3   # per-expert Hs: by path
    assert all(u.dtype == np.float32 for u in r._factors["path", "a"])
    again = [r.quantized("a", W3, f) for f in fmts]
    # the first two are kept, the third is solved again (same values), nothing is evicted
    assert again[0] is first[0] and again[1] is first[1] and again[2] is not first[2]
    assert all(mx.array_equal(x, y).item() for x, y in zip(again[2], first[2]))
    r.quantized("b", W3[0], fmts[0])
    assert [k for k, _ in r._factors] == ["path", "H"] and len(r._factors[next(reversed(r._factors))]) == 1
    monkeypatch.setattr(rounding, "FACTOR_BYTES", 1)   # over the bound: the older factors go before a new one
    r.quantized("c", W3[1], fmts[0], keep=False)
    assert len(r._factors) == 1 and next(iter(r._factors))[0] == "H"
    monkeypatch.setattr(rounding, "CACHE_ENTRIES", 64)
    monkeypatch.setattr(rounding, "CACHE_BYTES", first[0][0].nbytes)   # a byte budget smaller than one result
    r2 = Rounding({"a": H3})
    assert r2.quantized("a", W3, fmts[0]) is not r2.quantized("a", W3, fmts[0])


def test_layers_with_equal_grams_are_factored_once(monkeypatch):
    # q/k/v (gate/up) see one input, so their Grams are equal arrays: one factorisation serves all, and the
    # rounding equals a fresh solve; a different Gram is factored again
    rng = np.random.default_rng(4)
    X = rng.standard_normal((512, 128)).astype(np.float32)
    H = X.T @ X
    Hb = H + np.eye(128, dtype=np.float32)
    W = {k: mx.array(rng.standard_normal((n, 128)).astype(np.float32) * 0.02) for k, n in
         (("q", 96), ("k", 32), ("v", 32), ("o", 64))}
    calls = []
    real = gptq._inverse_cholesky
    monkeypatch.setattr(gptq, "_inverse_cholesky", lambda h: calls.append(1) or real(h))
    r = Rounding({"q": mx.array(H), "k": mx.array(H.copy()), "v": H.copy(), "o": mx.array(Hb)})
    fmt = Format.affine(4, 64)
    got = {k: r.quantized(k, W[k], fmt, keep=False) for k in ("q", "k", "v")}
    assert len(calls) == 1
    r.quantized("o", W["o"], fmt, keep=False)
    assert len(calls) == 2
    for k in ("k", "v"):
        fresh = Rounding({k: H}).quantized(k, W[k], fmt, keep=False)
        assert all(mx.array_equal(a, b).item() for a, b in zip(got[k], fresh))


def _calibrated(path, tokens, paths_filter=None):
    """A Calibration whose Hessians are filled (head Gram, embedding Fisher) without measuring anything."""
    from mixq.core.formats import parse_candidates
    from mixq.quant.calibpass import Calibration, make_rounding

    lm = load(path, compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    rounding, H = make_rounding(a, "gptq")
    cal = Calibration(lm.runner(), a, tokens, parse_candidates("4:64,float"), rounding=rounding, hessians=H,
                      method="estimate", target_bpw=4.5, source_dtypes=lm.source_dtypes, batch_size=2)
    cal.prepare_rounding()
    return lm, a, rounding, H


def test_gptq_lowers_kl_of_the_output_layer(nemotron_dense):
    """What GPTQ is for: the same format, lower KL than round-to-nearest, on a real forward; and the head's
    H is exactly the Gram of the final normed hidden states."""
    tokens = mx.array(np.random.default_rng(0).integers(1, 200, size=(4, 32)).astype(np.int32))
    lm, a, rounding, H = _calibrated(nemotron_dense, tokens)
    f32 = load(nemotron_dense)
    r = BlockRunner(f32.model)
    h = r.embed(tokens)
    for i in range(r.num_blocks):
        h = r.block(i, h)
    X = r.norm(h).reshape(-1, h.shape[-1])
    assert mx.allclose(H["lm_head.weight"], X.T @ X, rtol=1e-4, atol=1e-3).item()
    ref = nn.log_softmax(f32.model(tokens), axis=-1)
    w = f32.model.lm_head.weight
    fmt = Format.affine(2, 64)

    def kl(wd):
        f32.model.lm_head.weight = wd
        lq = nn.log_softmax(f32.model(tokens), axis=-1)
        f32.model.lm_head.weight = w
        return (mx.exp(ref) * (ref - lq)).sum(-1).mean().item()

    src = w.astype(mx.bfloat16)
    assert kl(rounding.qdq("lm_head.weight", src, fmt)) < 0.9 * kl(quantize_dequantize(src, fmt))


def test_tied_embedding_gets_both_roles(qwen3):
    """A tied embedding is both a lookup table and the output layer: its H carries both second moments."""
    tokens = mx.array(np.random.default_rng(0).integers(1, 200, size=(2, 16)).astype(np.int32))
    lm, a, rounding, H = _calibrated(qwen3, tokens)
    assert lm.runner().tied
    emb = "model.embed_tokens.weight"
    assert emb in H and tuple(H[emb].shape) == (a.tensor(emb).shape[1],) * 2
    assert mx.trace(H[emb]).item() == pytest.approx(2.0, rel=1e-4)  # two trace-normalised parts
    assert rounding.uses_gptq(emb, Format.affine(4, 64))
    # block tensors have their H only while a sweep is at their block: asking elsewhere is an error
    block = next(p for p in H if p.startswith("model.layers.0."))
    with pytest.raises(MixqError, match="block the sweep is not at"):
        H[block]


@pytest.mark.parametrize("experts", [False, True])
def test_formats_solved_together_equal_one_by_one(experts):
    """quantized_many stacks the formats of one group size into one pass over the columns: the same arrays
    as solving each format alone, and the same round-to-nearest decisions."""
    if experts:
        w, H = _experts()
    else:
        W, X = _problem(rows=40, cols=256, seed=4)
        w, H = mx.array(W.astype(np.float32)).astype(mx.bfloat16), (X.T @ X).astype(np.float32)
    fmts = [Format.affine(b, g) for b in (2, 3, 4, 8) for g in (64, 128)]
    many = Rounding({"w": H}).quantized_many("w", w, fmts, keep=False)
    one = Rounding({"w": H})
    for f in fmts:
        alone = one.quantized("w", w, f, keep=False)
        assert all(mx.array_equal(a, b).item() for a, b in zip(many[str(f)], alone)), f


def test_kept_results_spill_to_files_and_read_back_equal(tmp_path):
    W3, H3 = _experts()
    fmts = [Format.affine(4, 64), Format.affine(3, 64)]
    mem = Rounding({"a": H3})
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "stale.safetensors").write_bytes(b"from an earlier run")
    disk = Rounding({"a": H3}, spill=tmp_path / "r")
    assert not (tmp_path / "r" / "stale.safetensors").exists()
    first = disk.quantized_many("a", W3, fmts)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["0.safetensors", "1.safetensors"]
    disk._solve = None   # read back from the files, not solved again
    again = disk.quantized_many("a", W3, fmts)
    ref = mem.quantized_many("a", W3, fmts)
    for f in fmts:
        assert all(mx.array_equal(x, y).item() and x.dtype == y.dtype
                   for x, y in zip(again[str(f)], ref[str(f)]))
        assert all(mx.array_equal(x, y).item() for x, y in zip(first[str(f)], ref[str(f)]))


@pytest.mark.parametrize("bits,dtype", [([4, 5], "bfloat16"), (3, "float16"), ([2, 8], "float32")])
def test_numpy_column_loop_matches_the_compiled_mlx_one(monkeypatch, bits, dtype):
    # on the CPU the column loop runs in numpy; it must round exactly as the mlx graph used on a GPU
    W, X = _problem(rows=40, cols=128, seed=3)
    U = gptq._inverse_cholesky((X.T @ X).astype(np.float32))[None]
    Wst = mx.array(np.stack([W.astype(np.float32)] * (len(bits) if isinstance(bits, list) else 1)))
    got = {}
    for flag in (False, True):
        monkeypatch.setattr(blas, "NUMPY_ON_CPU", flag)
        got[flag] = [np.array(a) for a in gptq._gptq(Wst, U, bits, 64, dtype)]
    for a, b in zip(got[False], got[True]):
        assert np.array_equal(a, b)


def test_tensors_solved_side_by_side_equal_one_at_a_time(monkeypatch, tmp_path):
    """Threads (`core.lanes.thread_map`) share one Rounding: the same packed arrays as solving in turn, q/k/v's
    equal Grams still factored once (a second thread waits for the first's factor), every result kept."""
    from mixq.core import lanes

    rng = np.random.default_rng(7)
    X = rng.standard_normal((512, 128)).astype(np.float32)
    H, Hb = X.T @ X, X.T @ X + np.eye(128, dtype=np.float32)
    W = {k: mx.array(rng.standard_normal((n, 128)).astype(np.float32) * 0.02) for k, n in
         (("q", 96), ("k", 32), ("v", 32), ("o", 64), ("up", 160))}
    Hs = {"q": mx.array(H), "k": mx.array(H.copy()), "v": mx.array(H.copy()), "o": mx.array(Hb), "up": mx.array(Hb)}
    fmts = [Format.affine(4, 64), Format.affine(3, 64)]
    calls = []
    real = gptq._inverse_cholesky
    monkeypatch.setattr(gptq, "_inverse_cholesky", lambda h: calls.append(1) or real(h))

    def solve_all(n_lanes, spill):
        monkeypatch.setattr(lanes, "LANES", n_lanes)
        r = Rounding(dict(Hs), spill=spill)
        for k in W:
            r.ready(k)
        got = lanes.thread_map(lambda k: r.quantized_many(k, W[k], fmts), list(W))
        return r, dict(zip(W, got))

    one_r, one = solve_all(1, tmp_path / "one")
    assert len(calls) == 2
    calls.clear()
    two_r, two = solve_all(2, tmp_path / "two")
    assert len(calls) == 2
    for k in W:
        for f in fmts:
            assert all(mx.array_equal(a, b).item() for a, b in zip(one[k][str(f)], two[k][str(f)])), (k, f)
            kept = two_r.quantized(k, W[k], f)   # read back from its file
            assert all(mx.array_equal(a, b).item() for a, b in zip(kept, one[k][str(f)])), (k, f)
    assert len(list((tmp_path / "two").glob("*.safetensors"))) == len(W) * len(fmts)


def test_released_rounding_keeps_no_factor_or_result_and_rounds_the_same_again():
    """`release` (after the last sweep that rounds) drops the factors and the kept results; which tensors fell
    back is still known, and a tensor asked for again is solved to the same arrays."""
    W, X = _problem(rows=64, cols=128, seed=3)
    r = Rounding({"w": X.T @ X})
    fmt = Format.affine(4, 64)
    first = r.quantized("w", mx.array(W), fmt)
    assert r._factors and r._cache
    name = r.name_for("w", fmt)
    r.release()
    assert not r._factors and not r._cache and r._cache_bytes == 0
    assert r.name_for("w", fmt) == name
    again = r.quantized("w", mx.array(W), fmt)
    assert all(mx.array_equal(a, b).item() for a, b in zip(first, again))


def test_released_results_are_solved_again_with_the_new_hessian():
    """`release` before the write sweep whose Grams cover more windows: a kept result and its factors solved
    with the old H are not reused; the tensor is solved again with the new one."""
    W, X = _problem(rows=64, cols=128, seed=3)
    _, X2 = _problem(rows=64, cols=128, seed=4)
    hs = {"w": X.T @ X}
    r = Rounding(hs)
    fmt = Format.affine(4, 64)
    old = r.quantized("w", mx.array(W), fmt)
    hs["w"] = X2.T @ X2
    assert all(mx.array_equal(a, b).item() for a, b in zip(r.quantized("w", mx.array(W), fmt), old))   # kept
    r.release()
    new = r.quantized("w", mx.array(W), fmt)
    fresh = Rounding({"w": X2.T @ X2}).quantized("w", mx.array(W), fmt)
    assert all(mx.array_equal(a, b).item() for a, b in zip(new, fresh))
    assert not mx.array_equal(new[0], old[0]).item()
