"""Forward sweeps: each stream's KL, top-1 and NLL equal a direct full-model computation; Grams recorded on
the way equal the layers' real inputs; streams never disturb each other or the float model."""

import mlx.core as mx
import numpy as np
import pytest

from mixq.core.anatomy import describe
from mixq.core.formats import Format, quantize_dequantize
from mixq.core.modelio import load
from mixq.quant.hessian import HessianMap
from mixq.quant.plan import candidate_items, uniform_formats
from mixq.quant.sweep import ForwardSweep, Stream, targets_of


def _tokens(n=4, length=24, seed=0):
    return mx.array(np.random.default_rng(seed).integers(1, 500, size=(n, length)).astype(np.int32))


def _direct(path, formats, tokens):
    """KL / same / nll per position with the formats applied to a float32 copy of the model (mlx rounding)."""
    ref_lm, q_lm = load(path), load(path)
    mods = dict(q_lm.model.named_modules())
    for p, f in formats.items():
        if f.is_quantized:
            m, name = p.rsplit(".", 1)
            w = getattr(mods[m], name)
            setattr(mods[m], name, quantize_dequantize(w.astype(getattr(mx, q_lm.source_dtypes[p])), f))
    zp, zq = ref_lm.model(tokens).astype(mx.float32), q_lm.model(tokens).astype(mx.float32)
    lp = zp - mx.logsumexp(zp, axis=-1, keepdims=True)
    lq = zq - mx.logsumexp(zq, axis=-1, keepdims=True)
    kl = (mx.exp(lp) * (lp - lq)).sum(-1)
    nll = -mx.take_along_axis(lq[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    return np.array(kl).ravel(), np.array(zq.argmax(-1) == zp.argmax(-1)).ravel(), np.array(nll).ravel()


@pytest.mark.parametrize("kind", ["nemotron-moe", "qwen3"])
def test_streams_equal_direct_computation(fixture_models, kind):
    path = fixture_models[kind]
    lm = load(path, compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    r = lm.runner(retain=False)
    items = candidate_items(a)
    block = next(t.path for t in items if t.layer == 2)
    cases = {
        "uniform": uniform_formats(a, Format.parse("4:64"))[0],
        "embedding": {f"{r.embed_path}.weight": Format.parse("3:64")},
        "block": {block: Format.parse("2:64")},
        "head": {r.head_path: Format.parse("mxfp4")},
    }
    tokens = _tokens()
    sweep = ForwardSweep(r, a, tokens, batch_size=3)
    res = sweep.run([Stream(k, v) for k, v in cases.items()])
    for name, fmts in cases.items():
        kl, same, nll = _direct(path, fmts, tokens)
        got = res.streams[name]
        assert np.allclose(got["kl"], kl, rtol=2e-3, atol=2e-6), name
        assert np.array_equal(got["same"], same), name
        assert np.allclose(got["nll"], nll, rtol=1e-4, atol=1e-4), name
        assert got["kl"].mean() > 0
    # the float model's own numbers come out of the same sweep
    full = load(path).model(tokens)
    lse = np.array(mx.logsumexp(full, axis=-1)).ravel()
    assert np.allclose(np.concatenate([np.array(x.lse).ravel() for x in res.references]), lse, atol=1e-4)


def test_streams_are_independent_and_block_forwards_counted(nemotron_dense):
    lm = load(nemotron_dense, compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    r = lm.runner()
    tokens = _tokens(n=2)
    u = uniform_formats(a, Format.parse("4:64"))[0]
    late = {t.path: Format.parse("2:64") for t in candidate_items(a) if t.layer == 5}
    alone = ForwardSweep(r, a, tokens).run([Stream("u", u)])
    both = ForwardSweep(r, a, tokens).run([Stream("late", late), Stream("u", u)])
    assert np.array_equal(alone.streams["u"]["kl"], both.streams["u"]["kl"])
    n = r.num_blocks
    # one batch: the float stream n blocks, "u" n blocks, "late" only its own block onwards
    assert both.block_forwards == n + n + (n - 5)


def test_grams_recorded_in_the_sweep_are_the_layer_inputs(nemotron_moe):
    lm = load(nemotron_moe, compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    r = lm.runner()
    paths = [t.path for t in candidate_items(a) if t.module_type in ("Linear", "SwitchLinear")]
    H = HessianMap(paths)
    seen = {}
    orig = H.set_block

    def spy(i, entries):
        if i is not None:
            seen.update(entries)
        orig(i, entries)

    H.set_block = spy
    tokens = _tokens(n=3)
    res = ForwardSweep(r, a, tokens, batch_size=2, gptq_paths=paths).run([], grams=True, hessians=H,
                                                                          keep_inputs=True)
    # a Linear's H is the Gram of what it saw: the normed block input for the first projection of a block
    t = next(t for t in candidate_items(a) if t.path.endswith("mixer.in_proj.weight"))
    layer = r.layers[t.layer]
    with r.resident(t.layer):
        X = mx.concatenate([layer.norm(h).reshape(-1, h.shape[-1]) for h in res.inputs[t.layer]])
    assert mx.allclose(seen[t.path], X.T @ X, rtol=1e-4, atol=1e-3).item()
    # a routed expert's H is the Gram of exactly the rows routed to it
    sw = next(t for t in candidate_items(a) if t.module_type == "SwitchLinear" and t.path.endswith("fc1.weight"))
    E = seen[sw.path]
    assert tuple(E.shape) == (sw.shape[0], sw.shape[-1], sw.shape[-1])
    total = sum(mx.trace(E[e]).item() for e in range(sw.shape[0]))
    with r.resident(sw.layer):
        xs = [r.layers[sw.layer].norm(h) for h in res.inputs[sw.layer]]
        k = lm.config["num_experts_per_tok"]
        rows = sum((x.reshape(-1, x.shape[-1]) ** 2).sum().item() for x in xs) * k
    assert total == pytest.approx(rows, rel=1e-4)
    # layers fed one input (q/k/v) get its Gram, computed once
    q = next(t for t in candidate_items(a) if t.path.endswith("q_proj.weight"))
    with r.resident(q.layer):
        X = mx.concatenate([r.layers[q.layer].norm(h).reshape(-1, h.shape[-1]) for h in res.inputs[q.layer]])
    for name in ("q_proj", "k_proj", "v_proj"):
        assert mx.allclose(seen[q.path.replace("q_proj", name)], X.T @ X, rtol=1e-4, atol=1e-3).item()
    # and the model is left without wrappers
    assert not any(type(m).__name__ == "Recorder" for _, m in lm.model.named_modules())
    # gram_blocks: only those blocks' Grams are recorded
    seen.clear()
    got = {}

    def spy2(i, entries):
        if i is not None:
            got[i] = set(entries)
        orig(i, entries)

    H.set_block = spy2
    ForwardSweep(r, a, tokens, batch_size=2, gptq_paths=paths).run([], grams=True, hessians=H, gram_blocks={q.layer})
    assert {i for i, e in got.items() if e} == {q.layer}


@pytest.mark.parametrize("kind", ["nemotron-moe", "qwen3"])
def test_an_untied_tables_rounding_is_let_go_before_the_head(fixture_models, kind):
    import gc
    import weakref

    lm = load(fixture_models[kind], compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    r = lm.runner(retain=False)
    emb = f"{r.embed_path}.weight"
    seen = {}

    def on_rounded(stream, path, q):
        if path == emb:
            seen["emb"] = weakref.ref(q)
        elif path == r.head_path:
            gc.collect()
            seen["alive at head"] = seen["emb"]() is not None

    fmts = uniform_formats(a, Format.parse("4:64"))[0]
    ForwardSweep(r, a, _tokens()).run([Stream("u", fmts)], on_rounded=on_rounded)
    # a tied table is the head: its rounding is kept for it (and then not rounded again)
    assert seen.get("alive at head", r.tied) is r.tied


def test_sample_positions_budget_and_determinism():
    from mixq.core.head import sample_positions

    assert sample_positions([2048, 2048], 6144, seed=0) is None   # 25M logits: every position
    got = sample_positions([2048, 2048, 1024], 49152, seed=3)
    again = sample_positions([2048, 2048, 1024], 49152, seed=3)
    other = sample_positions([2048, 2048, 1024], 49152, seed=4)
    total = sum(int(i.size) for i in got)
    assert total * 49152 <= (1 << 26) * 1.01 and total > 0.9 * (1 << 26) / 49152
    for i, n, a, b in zip(got, [2048, 2048, 1024], again, other):
        v = np.array(i)
        assert np.all(np.diff(v) > 0) and v[0] >= 0 and v[-1] < n   # sorted, distinct, in range
        assert np.array_equal(v, np.array(a)) and not np.array_equal(v, np.array(b))
    assert abs(int(got[2].size) / int(got[0].size) - 0.5) < 0.01   # the same fraction of every batch


def test_compare_positions_give_the_full_comparisons_values_there(fixture_models):
    from mixq.core.head import sample_positions

    path = fixture_models["qwen3"]
    lm = load(path, compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    r = lm.runner(retain=False)
    tokens = _tokens(n=5, length=24)
    u = uniform_formats(a, Format.parse("3:64"))[0]
    sweep = ForwardSweep(r, a, tokens, batch_size=2)
    full = sweep.run([Stream("u", u)])
    counts = [int(b.size) for b in sweep.batches]
    at = sample_positions(counts, vocab=100, seed=1, budget=100 * 40)
    assert at is not None and sum(int(i.size) for i in at) < sum(counts)
    part = ForwardSweep(r, a, tokens, batch_size=2).run([Stream("u", u)], references=full.references,
                                                       compare_positions=at)
    flat = np.concatenate([np.array(i) + sum(counts[:b]) for b, i in enumerate(at)])
    for k in ("kl", "same"):
        assert np.allclose(part.streams["u"][k], full.streams["u"][k][flat], rtol=1e-5, atol=1e-7), k
    # next-token NLL: only positions with a target (the last of each window has none)
    valid = np.concatenate([np.array(targets_of(b)).ravel() >= 0 for b in sweep.batches])
    rank = np.cumsum(valid) - 1
    kept = flat[valid[flat]]
    assert np.allclose(part.streams["u"]["nll"], full.streams["u"]["nll"][rank[kept]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["nemotron-moe", "qwen3"])
def test_a_stream_only_written_is_rounded_as_a_measured_one_without_a_forward(fixture_models, kind):
    lm = load(fixture_models[kind], compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    r = lm.runner()
    fmts = uniform_formats(a, Format.parse("4:64"))[0]

    def record(into):
        return lambda stream, path, q: into.setdefault(path, np.array(q.full(mx.float32)))

    measured, written = {}, {}
    first = ForwardSweep(r, a, _tokens(n=2)).run([Stream("u", fmts)], on_rounded=record(measured))
    again = ForwardSweep(r, a, _tokens(n=2)).run([Stream("u", fmts, measure=False)], references=first.references,
                                                 on_rounded=record(written))
    assert "u" in first.streams and again.streams == {} and again.block_forwards == 0
    assert r.head_path in written   # an untied head too; a tied one is the embedding's
    assert written.keys() == measured.keys()
    assert all(np.array_equal(written[p], measured[p]) for p in measured)


def test_gram_windows_add_their_rows_to_every_gram_and_the_head_s_not_a_kept_one(nemotron_moe):
    """`gram_tokens`: the Grams of the block Linears and the untied head are those of the calibration windows
    and the Gram windows together, as a sweep over all of them records; the routed experts' are the calibration
    windows' alone; a Gram kept from an earlier sweep (the calibration windows only) is not used; nothing is
    compared on the Gram windows."""
    lm = load(nemotron_moe, compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    r = lm.runner()
    assert not r.tied
    paths = [t.path for t in candidate_items(a) if t.module_type in ("Linear", "SwitchLinear")] + [r.head_path]

    def grams(sweep, H):
        seen, orig = {}, H.set_block

        def spy(i, entries):
            if i is not None:
                seen.update(entries)
            orig(i, entries)

        H.set_block = spy
        res = sweep.run([], grams=True, hessians=H)
        return seen, res

    calib, extra = _tokens(n=3), _tokens(n=3, seed=1)
    whole, res = grams(ForwardSweep(r, a, mx.concatenate([calib, extra]), batch_size=2, gptq_paths=paths),
                       HessianMap(paths))
    whole_head = res.head_gram
    own, _ = grams(ForwardSweep(r, a, calib, batch_size=2, gptq_paths=paths), HessianMap(paths))
    H = HessianMap(paths)
    for i in range(r.num_blocks):   # a wrong Gram kept for every block: must not be used
        H.keep(i, {p: mx.zeros_like(g) for p, g in whole.items() if not hasattr(g, "rows")
                   and next(t.layer for t in a.tensors if t.path == p) == i})
    assert H.kept_all(range(r.num_blocks))
    got, res = grams(ForwardSweep(r, a, calib, batch_size=2, gptq_paths=paths, gram_tokens=extra), H)
    head = H.global_[r.head_path]   # set by the sweep: the head is rounded with it
    assert set(got) == set(whole)
    for p, g in whole.items():
        if hasattr(g, "rows"):   # experts: the calibration windows' routed rows only
            assert got[p].rows.shape == own[p].rows.shape != g.rows.shape
            for e in range(g.experts):
                assert mx.allclose(got[p][e], own[p][e], rtol=1e-4, atol=1e-3).item(), (p, e)
        else:
            assert mx.allclose(got[p], g, rtol=1e-4, atol=1e-3).item(), p
    assert mx.allclose(head, whole_head, rtol=1e-4, atol=1e-3).item()
    assert sum(x.shape[0] for x in res.final) == calib.shape[0]   # the calibration windows' states only
    assert res.block_forwards == (2 + 2) * r.num_blocks   # two batches each
