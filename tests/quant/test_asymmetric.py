"""GPTQ against the quantized model's own inputs: each dense layer is fitted to the inputs the stream's rounded
layers before it really produce (over the calibration and the Gram windows), toward the float layer's outputs
on the float inputs; routed experts keep the float Grams."""

import mlx.core as mx
import numpy as np
import pytest

from mixq.core.anatomy import describe
from mixq.core.formats import Format
from mixq.core.modelio import load
from mixq.quant.asymmetric import OwnInputs, block_groups, call_groups, feeding, tapped, target
from mixq.quant.hessian import HessianMap
from mixq.quant.plan import candidate_items, uniform_formats
from mixq.quant.rounding import Rounding
from mixq.quant.sweep import ForwardSweep, Stream


def _tokens(n=3, length=24, seed=0):
    return mx.array(np.random.default_rng(seed).integers(1, 500, size=(n, length)).astype(np.int32))


@pytest.mark.parametrize("rows", [3, 40])   # fewer rows than inputs (solved with them) or more (M formed)
def test_target_is_the_ridge_least_squares_weight(rows):
    rng = np.random.default_rng(0)
    d = 16
    X = rng.standard_normal((200, d)).astype(np.float32)
    Xq = X + 0.3 * rng.standard_normal((200, d)).astype(np.float32)
    W = rng.standard_normal((rows, d)).astype(np.float32)
    C, H = X.T @ Xq, Xq.T @ Xq
    for n, ridge in ((200, 2.0), (200, 0.5), (50, 2.0)):   # the rows H sums: fewer rows an input, more ridge
        got = np.array(target(mx.array(W), mx.array(C), mx.array(H), n, ridge=ridge))
        lam = ridge * d / n * np.mean(np.diag(H))
        want = (W @ C + lam * W) @ np.linalg.inv(H + lam * np.eye(d))
        assert np.allclose(got, want, rtol=1e-3, atol=1e-4), (n, ridge)
    # the stream's inputs the float ones: the float weight itself, whatever the ridge
    same = np.array(target(mx.array(W), mx.array(X.T @ X), mx.array(X.T @ X), 200, ridge=1e-3))
    assert np.allclose(same, W, rtol=1e-3, atol=1e-4)


def test_call_groups_follow_the_blocks_order_and_shared_inputs(fixture_models):
    for kind, want in (("nemotron-moe", {"*": [["q_proj", "k_proj", "v_proj"], ["o_proj"]],
                                         "M": [["in_proj"], ["out_proj"]],
                                         "E": [["shared_experts.up_proj"], ["shared_experts.down_proj"]]}),
                       ("qwen3", {"block": [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"],
                                            ["down_proj"]]})):
        lm = load(fixture_models[kind], compute_dtype=None, lazy=True)
        a = describe(lm.model, lm.config)
        r = lm.runner()
        x = r.embed(_tokens(n=1))
        for i, layer in enumerate(r.layers):
            mods = [t.module for t in a.tensors if t.layer == i and t.module_type == "Linear"]
            with r.resident(i):
                got = call_groups(r, i, sorted(mods), x)
            names = [[m.split(".mixer.")[-1] if ".mixer." in m else m.split(".")[-1] for m in g] for g in got]
            expect = want.get(getattr(layer, "block_type", "block"))
            if expect is not None:
                assert [sorted(g) for g in names] == [sorted(g) for g in expect], (kind, i, names)
        assert not any(type(m).__name__ == "Tap" for _, m in lm.model.named_modules())


def test_fed_inputs_replace_the_recomputed_ones(qwen3):
    """A rounded block's last run takes its groups' inputs from the runs that fitted them: the same output as
    a plain run, and what only the fed layers read is not used (so never computed)."""
    lm = load(qwen3, compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    r = lm.runner()
    x = r.embed(_tokens(n=2))
    mods = sorted(t.module for t in a.tensors if t.layer == 0 and t.module_type == "Linear")
    with r.resident(0):
        groups = call_groups(r, 0, mods, x)
        with tapped(r.model, [g[0] for g in groups]) as taps:
            want = r.block(0, x)
            mx.eval(want, [taps[g[0]].x for g in groups])
            fed = {m: [taps[g[0]].x] for g in groups for m in g}
        assert mx.allclose(feeding(r, 0, [x], fed)[0], want, rtol=1e-5, atol=1e-5).item()
        q = next(m for m in mods if m.endswith("q_proj"))
        o = next(m for m in mods if m.endswith("o_proj"))
        stored = r.stored(r.layer_prefix(0))
        # o_proj's input fed: q_proj's weight (which only o_proj's input reads) no longer matters
        with r.swap(0, {f"{q}.weight": mx.zeros_like(stored[f"{q}.weight"])}):
            assert mx.allclose(feeding(r, 0, [x], fed)[0], want, rtol=1e-5, atol=1e-5).item()
            assert not mx.allclose(feeding(r, 0, [x], {})[0], want, rtol=1e-3, atol=1e-3).item()
        # the fed value is what the layer takes: zeros into o_proj are o_proj's weight at zero
        with r.swap(0, {f"{o}.weight": mx.zeros_like(stored[f"{o}.weight"])}):
            zero_o = r.block(0, x)
        got = feeding(r, 0, [x], {o: [mx.zeros_like(fed[o][0])]})[0]
        assert mx.allclose(got, zero_o, rtol=1e-5, atol=1e-5).item()
    assert not any(type(m).__name__ == "Tap" for _, m in lm.model.named_modules())


def test_inputs_are_fed_only_where_each_layer_runs_once(qwen3, monkeypatch):
    """A layer called twice in a block run takes two inputs: its first run's kept input must not be fed to both."""
    lm = load(qwen3, compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    r = lm.runner()
    paths = [t.path for t in candidate_items(a) if t.module_type == "Linear"]
    sweep = ForwardSweep(r, a, _tokens(n=2), batch_size=2, gptq_paths=paths)
    x = r.embed(_tokens(n=2))
    with r.resident(0):
        groups, once = block_groups(sweep, 0, x)
        assert once and len(groups) == 4
        block = r.block
        monkeypatch.setattr(r, "block", lambda i, h: block(i, block(i, h)))   # every layer twice a run
        again, once = block_groups(sweep, 0, x)
        assert not once and again == groups


def _inputs(r, module, tokens, upto: int, overrides: dict):
    """`module`'s input rows in block `upto` when the model runs with `overrides` (path -> float array)."""
    h = r.embed(tokens)
    for j in range(upto):
        with r.resident(j, overrides):
            h = r.block(j, h)
            mx.eval(h)
    with r.resident(upto, overrides), tapped(r.model, [module]) as taps:
        r.block(upto, h)
        x = taps[module].x
        mx.eval(x)
    return x.reshape(-1, x.shape[-1]).astype(mx.float32)


def test_each_layer_is_fitted_to_the_streams_own_inputs(nemotron_moe):
    lm = load(nemotron_moe, compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    r = lm.runner()
    assert not r.tied
    items = candidate_items(a)
    paths = [t.path for t in items if t.module_type in ("Linear", "SwitchLinear")] + [r.head_path]
    fmts = {p: f for p, f in uniform_formats(a, Format.parse("4:64"))[0].items() if p != f"{r.embed_path}.weight"}
    H = HessianMap(paths, keep=False)
    own = Rounding(H).fork(OwnInputs(H))
    seen, rounded = {}, {}
    solve = own._solve

    def spy(path, w, fs):
        seen[path] = (w, own.hessians[path])
        return solve(path, w, fs)

    own._solve = spy
    calib, extra = _tokens(seed=0), _tokens(seed=1)
    stream = Stream("own", fmts, own, own_inputs=True)
    res = ForwardSweep(r, a, calib, batch_size=2, gptq_paths=paths, gram_tokens=extra).run(
        [stream], grams=True, hessians=H, on_rounded=lambda s, p, q: rounded.__setitem__(p, q))
    assert res.streams["own"]["kl"].mean() > 0
    tokens = mx.concatenate([calib, extra])
    full = {p: q.full(mx.float32) for p, q in rounded.items()}
    by_path = {t.path: t for t in items}

    def check(path, before: set):
        t = by_path[path]
        over = {p: w for p, w in full.items()
                if (by_path[p].layer is not None and by_path[p].layer < t.layer) or p in before}
        Xq = _inputs(r, t.module, tokens, t.layer, over)
        X = _inputs(r, t.module, tokens, t.layer, {})
        w, h = seen[path]
        assert mx.allclose(h, Xq.T @ Xq, rtol=1e-4, atol=1e-3).item(), path
        want = target(r.stored(r.layer_prefix(t.layer))[path], X.T @ Xq, Xq.T @ Xq, Xq.shape[0])
        # in the source dtype (bfloat16 here): one unit in the last place apart at most
        assert mx.allclose(w.astype(mx.float32), want.astype(mx.float32), rtol=8e-3, atol=1e-4).item(), path
        return X, Xq

    first = next(t.path for t in items if t.layer == 0 and t.path.endswith("in_proj.weight"))
    X, Xq = check(first, set())   # nothing rounded before it: its own inputs are the float ones
    assert mx.allclose(X, Xq).item()
    o = next(t for t in items if (t.layer or 0) > 2 and t.path.endswith("o_proj.weight"))
    qkv = {o.path.replace("o_proj", n) for n in ("q_proj", "k_proj", "v_proj")}
    X, Xq = check(o.path, qkv)    # after the earlier blocks and its block's q/k/v, rounded
    assert not mx.allclose(X, Xq, rtol=1e-3, atol=1e-3).item()
    # a routed expert keeps the float model's Grams of the calibration windows' rows
    sw = next(t for t in items if t.module_type == "SwitchLinear")
    assert type(seen[sw.path][1]).__name__ == "ExpertGrams"
    assert seen[sw.path][1].rows.shape[0] == calib.size * lm.config["num_experts_per_tok"]
    # the head: the Gram of the stream's own final normed states over every window
    h = r.embed(tokens)
    for j in range(r.num_blocks):
        with r.resident(j, full):
            h = r.block(j, h)
            mx.eval(h)
    hn = r.norm(h).reshape(-1, h.shape[-1]).astype(mx.float32)
    assert mx.allclose(seen[r.head_path][1], hn.T @ hn, rtol=1e-4, atol=1e-3).item()
    assert not any(type(m).__name__ == "Tap" for _, m in lm.model.named_modules())


def test_an_own_input_stream_must_run():
    with pytest.raises(ValueError, match="own inputs"):
        Stream("x", {}, Rounding(HessianMap([])).fork(OwnInputs(HessianMap([]))), own_inputs=True, measure=False)
    with pytest.raises(ValueError, match="own inputs"):
        Stream("x", {}, Rounding(HessianMap([])), own_inputs=True)
