"""The sensitivity estimator against exact KL, the backward sweep's gradients, calibration, keys, resume."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mixq.core.anatomy import describe
from mixq.core.errors import MixqError
from mixq.core.formats import parse_candidates
from mixq.core.modelio import load
from mixq.quant.backward import backward_sweep
from mixq.quant.calibpass import Calibration, make_rounding
from mixq.quant.estimate import head_estimate, near_formats, rounded_estimates
from mixq.quant.plan import candidate_items
from mixq.quant.sensitivity import FORMAT, fit_calibration, load_sensitivity
from mixq.quant.sweep import ForwardSweep

CANDS = parse_candidates("2:64,3:64,4:64,6:64,8:64,float")


def _tokens(n=8, length=64, seed=0):
    return mx.array(np.random.default_rng(seed).integers(1, 500, size=(n, length)).astype(np.int32))


def _measure(path, method, tokens=None, rounding="gptq", **kw):
    lm = load(path, compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    rounding, H = make_rounding(a, rounding)
    cal = Calibration(lm.runner(), a, _tokens() if tokens is None else tokens, CANDS, rounding=rounding,
                      hessians=H, method=method, target_bpw=4.5, source_dtypes=lm.source_dtypes, batch_size=4, **kw)
    return cal.run()


@pytest.fixture(scope="module")
def both(nemotron_dense):
    return _measure(nemotron_dense, "estimate"), _measure(nemotron_dense, "exact")


def test_backward_sweep_gradient_is_the_models(nemotron_moe):
    """The gradient reaching the embedding output equals mx.grad through the whole float32 model."""
    lm = load(nemotron_moe, compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    r = lm.runner(retain=False)
    paths = {t.path for t in candidate_items(a)}
    tokens = _tokens(n=4, length=32)
    fwd = ForwardSweep(r, a, tokens, batch_size=2).run([], keep_inputs=True, sample_key=mx.random.key(0))
    res = backward_sweep(r, a, fwd, gptq_paths=paths)
    f32 = load(nemotron_moe)
    x, labels = tokens[:2], fwd.labels[0]

    def loglik(h):
        for layer in f32.model.backbone.layers:
            kind = layer.block_type
            from mlx_lm.models.base import create_attention_mask, create_ssm_mask

            mask = create_attention_mask(h, None) if kind == "*" else create_ssm_mask(h, None) if kind == "M" else None
            h = layer(h, mask=mask) if mask is not None or kind in "*M" else layer(h)
        z = f32.model.lm_head(f32.model.backbone.norm_f(h))
        return mx.take_along_axis(z - mx.logsumexp(z, axis=-1, keepdims=True), labels[..., None], axis=-1).sum()

    g = mx.grad(loglik)(f32.model.backbone.embeddings(x))
    assert (mx.abs(g - res.embed_grads[0]).max() / mx.abs(g).max()).item() < 1e-4
    # every block's inputs were let go once its backward was done
    assert all(i is None for i in fwd.inputs)


def test_estimate_tracks_exact_kl(both):
    """Every (tensor, format) pair: estimate and exact KL rank alike and agree in size (second order)."""
    from scipy.stats import spearmanr

    est, ex = both
    e, x = [], []
    for path, v in ex["tensors"].items():
        for f, val in v["costs"].items():
            if f != "float":
                e.append(est["tensors"][path]["estimates"][f])
                x.append(val)
    e, x = np.array(e), np.array(x)
    assert spearmanr(e, x)[0] > 0.98
    ratio = np.log(e / x)
    assert abs(np.median(ratio)) < 0.2 and np.percentile(np.abs(ratio), 90) < np.log(2.0)
    # the head role is calibrated by exact KLs: the same numbers the exact method measures at those formats
    exact_head = ex["tensors"]["lm_head.weight"]["costs"]
    points = est["calibration"]["head"]["points"]
    assert points and all(p["exact"] == pytest.approx(exact_head[p["format"]], rel=1e-4) for p in points)


def test_estimate_costs_a_fraction_of_the_exact_pass(both):
    est, ex = both
    c, d = est["cost"], ex["cost"]
    assert c["exact_measurements"] < c["measurements"] == d["measurements"] == d["exact_measurements"]
    assert c["total_block_forward_equivalents"] < 0.5 * d["total_block_forward_equivalents"]
    assert c["exact_pass_block_forward_equivalents"] == d["exact_pass_block_forward_equivalents"]
    for stage in ("calibration forward", "calibration backward + estimates", "embedding and head"):
        assert stage in c["block_forward_equivalents"] and stage in c["seconds"]


def test_calibration_fit_is_stated_and_applied(both):
    est, _ = both
    cal = est["calibration"]
    assert cal["points"] and {"path", "format", "estimate", "exact"} <= set(cal["points"][0])
    for p in cal["points"]:
        kind = est["tensors"][p["path"]]["kind"]
        c = cal["kinds"][kind]["c"]
        assert est["tensors"][p["path"]]["costs"][p["format"]] == pytest.approx(p["estimate"] * c, rel=1e-4)
    # every block kind has a factor; the head's own factor is fitted on its formats nearest the target
    kinds = {v["kind"] for v in est["tensors"].values() if v["layer"] is not None}
    assert kinds <= set(cal["kinds"])
    head = est["tensors"]["lm_head.weight"]
    assert head["costs"] == {**head["estimates"], "float": 0.0}
    near = near_formats(head["shape"], [f for f in CANDS if f.is_quantized], 4.5, head["dtype"])
    assert [p["format"] for p in cal["head"]["points"]] == [str(f) for f in near] and len(near) == 2
    assert cal["head"]["n"] == 2 and cal["head"]["c"] > 0
    for p in cal["head"]["points"]:
        assert head["costs"][p["format"]] == pytest.approx(p["estimate"] * cal["head"]["c"], rel=1e-4)


def test_fit_calibration_shrinks_and_pools():
    kinds = {"a": "q", "b": "q", "c": "v", "d": "o"}
    pts = [("a", "4:64", 1.0, 2.0), ("b", "4:64", 1.0, 2.0), ("c", "4:64", 1.0, 0.5)]
    fit = fit_calibration(pts, kinds, prior=1.0)
    assert fit["kinds"]["q"]["c"] == pytest.approx(np.exp(2 * np.log(2) / 3), rel=1e-5)
    assert fit["kinds"]["q"]["n"] == 2 and fit["kinds"]["q"]["loo_abs_log_error"] == pytest.approx(np.log(2) / 2, rel=1e-5)
    assert fit["kinds"]["o"]["source"] == "pooled" and fit["kinds"]["o"]["c"] == fit["pooled"]["c"]


def test_method_is_in_the_key_and_resume(nemotron_dense, tmp_path):
    partial = tmp_path / "p.jsonl"
    key = {"k": 1}
    full = _measure(nemotron_dense, "estimate", partial=partial, key=key)
    lines = partial.read_text().splitlines()
    partial.write_text("\n".join(lines[:4]) + "\n")  # as if interrupted after 3 tensors
    resumed = _measure(nemotron_dense, "estimate", partial=partial, key=key)
    assert resumed["cost"]["resumed_tensors"] == 3
    assert resumed["tensors"] == full["tensors"]  # deterministic, resumed or not
    other = _measure(nemotron_dense, "exact", partial=partial, key=key)  # the other method does not reuse it
    assert other["cost"]["resumed_tensors"] == 0
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"format": FORMAT, "key": {**key, "method": full["method"]}, **full}))
    load_sensitivity(f, {**key, "method": full["method"]})
    with pytest.raises(MixqError, match="different settings \\(method\\)"):
        load_sensitivity(f, {**key, "method": other["method"]})


@pytest.mark.parametrize("with_cheap", [False, True])
def test_rounded_estimates_solve_gptq_near_the_target_and_scale_the_rest(with_cheap):
    """GPTQ only at the near formats, estimated in full there; every other format is its round-to-nearest
    estimate (the cheap form when given) times the ratio at the nearest near format: GPTQ's full over
    round-to-nearest's for affine formats, round-to-nearest's full over its cheap one for microscaled."""
    from mixq.quant.rounding import Rounding
    from mixq.quant.qweight import round_weight

    rng = np.random.default_rng(0)
    w = mx.array(rng.standard_normal((48, 128)).astype(np.float32)).astype(mx.bfloat16)
    x = rng.standard_normal((512, 128)).astype(np.float32) * np.linspace(0.2, 3, 128, dtype=np.float32)
    H = mx.array(x.T @ x)
    rounding = Rounding({"w": H})
    fmts = parse_candidates("2:64,3:64,4:64,4:128,mxfp4,6:64,8:64")
    near = near_formats(w.shape, fmts, 4.75, "bfloat16")
    assert [str(f) for f in near] == ["4:64", "6:64"]
    w32 = w.astype(mx.float32)

    def est(q):
        d = w32 - q.full(mx.float32)
        return (((d @ H) * d).sum().item(), float(mx.abs(d).sum().item()))

    def diag(q):
        d = w32 - q.full(mx.float32)
        return (((d ** 2) @ mx.diagonal(H)).sum().item(), float(mx.abs(d).sum().item()))

    cheap = diag if with_cheap else est
    seen = []
    got = rounded_estimates(rounding, "w", w, fmts, near, est, cheap=diag if with_cheap else None,
                            on_solved=lambda f, q: seen.append(str(f)))
    assert seen == ["4:64", "6:64"] and set(got) == {str(f) for f in fmts}
    solved = {str(f): est(round_weight(rounding, "w", w, f)) for f in fmts}
    rtn = {str(f): est(round_weight(None, "w", w, f)) for f in fmts}
    low = {str(f): cheap(round_weight(None, "w", w, f)) for f in fmts}
    for f in ("4:64", "6:64"):
        assert got[f] == pytest.approx(solved[f], rel=1e-6)
    gain = {f: [a / b for a, b in zip(solved[f], low[f])] for f in ("4:64", "6:64")}
    for f, src in (("2:64", "4:64"), ("3:64", "4:64"), ("4:128", "4:64"), ("8:64", "6:64")):
        assert got[f] == pytest.approx([a * k for a, k in zip(low[f], gain[src])], rel=1e-6)
    k = [a / b for a, b in zip(rtn["4:64"], low["4:64"])]
    assert got["mxfp4"] == pytest.approx([a * c for a, c in zip(low["mxfp4"], k)], rel=1e-6)
    assert solved["4:64"][0] < rtn["4:64"][0]  # GPTQ did lower the output error it minimises


def test_cheap_estimate_is_the_full_one_when_inputs_are_uncorrelated():
    """The diagonal form equals the full one exactly when A is diagonal, and on real recorded inputs it
    differs from it (the off-diagonal terms it drops are not zero)."""
    from mixq.quant.estimate import FisherStats

    stats = FisherStats(100)
    rng = np.random.default_rng(2)
    stats.gd["w"] = mx.array(rng.random(16).astype(np.float32))
    dW = mx.array(rng.standard_normal((16, 32)).astype(np.float32))
    Hd = mx.diag(mx.array(rng.random(32).astype(np.float32)))
    assert stats.cheap_estimate("w", Hd, dW) == pytest.approx(stats.estimate("w", Hd, dW), rel=1e-5)
    X = rng.standard_normal((200, 32)).astype(np.float32) + 2.0  # a shared mean: correlated inputs
    Hc = mx.array(X.T @ X)
    assert stats.cheap_estimate("w", Hc, dW) != pytest.approx(stats.estimate("w", Hc, dW), rel=1e-2)


def test_head_estimate_is_the_fisher_form_in_either_input_form():
    """1/(2N^2) sum_i G_i (dW A dW^T)_ii, chunk by chunk, equal from the Gram or from the rows themselves."""
    from mixq.core.formats import Format
    from mixq.quant.qweight import round_weight

    rng = np.random.default_rng(1)
    W = mx.array(rng.standard_normal((3000, 64)).astype(np.float32))
    X = mx.array(rng.standard_normal((2, 10, 64)).astype(np.float32))
    G = mx.array(rng.random(3000).astype(np.float32))
    q = round_weight(None, "w", W, Format.parse("3:64"))
    d = W - q.full(mx.float32)
    rows = X.reshape(-1, 64)
    A = rows.T @ rows
    want = float((G * ((d @ A) * d).sum(-1)).sum().item()) / (2 * 20 * 20)
    assert head_estimate(G, A, W, q, 20) == pytest.approx(want, rel=1e-4)
    assert head_estimate(G, None, W, q, 20, rows=[X[:1], X[1:]]) == pytest.approx(want, rel=1e-4)
    # the cheap form: A's diagonal only, from the Gram or from the rows
    cheap = float((G * ((d ** 2) @ mx.diagonal(A))).sum().item()) / (2 * 20 * 20)
    assert head_estimate(G, A, W, q, 20, diagonal=True) == pytest.approx(cheap, rel=1e-4)
    assert head_estimate(G, None, W, q, 20, rows=[X[:1], X[1:]], diagonal=True) == pytest.approx(cheap, rel=1e-4)


def test_estimate_without_gptq_has_the_heads_input_gram(nemotron_dense):
    """--rounding rtn records no GPTQ Grams; the head estimate still gets its input's Gram (more positions
    than the head is wide, so the Gram form is taken) and is calibrated on round-to-nearest heads."""
    est = _measure(nemotron_dense, "estimate", rounding="rtn")
    head = est["tensors"]["lm_head.weight"]
    assert 8 * 64 > head["shape"][-1]
    assert [p["format"] for p in est["calibration"]["head"]["points"]] == \
        [str(f) for f in near_formats(head["shape"], [f for f in CANDS if f.is_quantized], 4.5, head["dtype"])]
    assert all(v > 0 for f, v in head["costs"].items() if f != "float")


def test_exact_points_on_a_position_sample_at_large_vocabularies(nemotron_dense, monkeypatch, both):
    """Over the logit budget the exact subset and the head fit compare a seeded sample of positions (each a
    head projection of every position at a 49k-151k vocabulary); the sample is stated, the estimates are not
    touched, and the exact points stay those of the same tensors at the same formats."""
    from mixq.core import head

    full, _ = both
    assert full["calibration"]["positions"]["compared"] == full["calibration"]["positions"]["of"] == 8 * 64
    lm = load(nemotron_dense, compute_dtype=None, lazy=True)
    vocab = describe(lm.model, lm.config).tensor("lm_head.weight").shape[0]
    monkeypatch.setattr(head, "SAMPLE_LOGITS", vocab * 8 * 64 // 4)   # a quarter of the positions
    part = _measure(nemotron_dense, "estimate")
    pos = part["calibration"]["positions"]
    assert pos["of"] == 8 * 64 and pos["compared"] == 8 * 64 // 4
    assert part["tensors"].keys() == full["tensors"].keys()
    for p, v in part["tensors"].items():   # the estimates themselves use every position
        if p != "lm_head.weight":   # (the head's carry its own fitted factor, from the sampled exact KLs)
            assert v["estimates"] == full["tensors"][p]["estimates"], p
    ratio = {f: part["tensors"]["lm_head.weight"]["estimates"][f] / x
             for f, x in full["tensors"]["lm_head.weight"]["estimates"].items()}
    assert max(ratio.values()) == pytest.approx(min(ratio.values()), rel=1e-3)
    assert max(ratio.values()) == pytest.approx(part["calibration"]["head"]["c"] / full["calibration"]["head"]["c"],
                                                rel=1e-3)
    key = lambda pts: [(x.get("path"), x["format"]) for x in pts]   # noqa: E731
    assert key(part["calibration"]["points"]) == key(full["calibration"]["points"])
    assert key(part["calibration"]["head"]["points"]) == key(full["calibration"]["head"]["points"])
    for a, b in zip(part["calibration"]["points"], full["calibration"]["points"]):
        assert a["exact"] > 0 and a["exact"] != b["exact"]
