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
from mixq.quant.plan import candidate_items
from mixq.quant.sensitivity import FORMAT, fit_calibration, load_sensitivity
from mixq.quant.sweep import ForwardSweep

CANDS = parse_candidates("2:64,3:64,4:64,6:64,8:64,float")


def _tokens(n=8, length=64, seed=0):
    return mx.array(np.random.default_rng(seed).integers(1, 500, size=(n, length)).astype(np.int32))


def _measure(path, method, tokens=None, **kw):
    lm = load(path, compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    rounding, H = make_rounding(a, "gptq")
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
    # the head is measured exactly by both methods
    exact_head = {f: v for f, v in ex["tensors"]["lm_head.weight"]["costs"].items() if f != "float"}
    assert est["tensors"]["lm_head.weight"]["estimates"] == pytest.approx(exact_head, rel=1e-4)


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
    # every block kind has a factor; the head keeps its exact numbers
    kinds = {v["kind"] for v in est["tensors"].values() if v["layer"] is not None}
    assert kinds <= set(cal["kinds"])
    assert est["tensors"]["lm_head.weight"]["costs"] == {**est["tensors"]["lm_head.weight"]["estimates"],
                                                         "float": 0.0}


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
