"""End-to-end distillation of scales and biases (`mixq.quant.distill`): codes kept, source dtype, the epoch
kept is the one the validation windows pick (none: the written values), deterministic; shards patched in
place."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mixq.core.anatomy import describe
from mixq.core.errors import MixqError
from mixq.core.formats import Format
from mixq.core.modelio import load
from mixq.core.stwriter import ShardWriter, patch
from mixq.quant.distill import DistillSettings, Distiller, batch_size, streamed_targets, targets, topk_kl
from mixq.quant.plan import uniform_formats
from mixq.quant.qweight import round_weight


def _quantized(path):
    lm = load(path, compute_dtype=None)
    a = describe(lm.model, lm.config)
    fmts = uniform_formats(a, Format.parse("4:64"))[0]
    params = dict(__import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(lm.model.parameters()))
    return {p: round_weight(None, p, params[p], f) for p, f in fmts.items() if f.is_quantized}


def _tokens(n, seed):
    return np.random.default_rng(seed).integers(1, 500, size=(n, 32)).astype(np.int32)


def _run(path, settings, q=None, same=False):
    """`same`: validate on the training windows (what the steps minimise, so an epoch must beat the start)."""
    q = q or _quantized(path)
    teacher = load(path).model
    train = _tokens(settings.windows, 0)
    valid = train[:settings.validation] if same else _tokens(settings.validation, 1)
    return Distiller(teacher, q, settings).run(train, valid), q


def test_distillation_keeps_codes_and_source_dtype_and_lowers_validation_kl(nemotron_moe):
    st = DistillSettings(windows=4, validation=4, epochs=2, lr=1e-3, batch=2, top_k=16)   # below the vocabulary
    (out, rec), q = _run(nemotron_moe, st, same=True)
    assert rec["kept"] and rec["validation_kl_after"] < rec["validation_kl_before"]
    assert rec["epoch_kept"] in (1, 2) and len(rec["epochs_run"]) == 2 and rec["steps"] == 4
    assert any("switch_mlp" in p for p in rec["tensors"])   # fused experts are tuned too
    changed = 0
    for p in rec["tensors"]:
        assert out[p].wq is q[p].wq   # the codes as written
        assert out[p].scales.dtype == q[p].scales.dtype and out[p].biases.dtype == q[p].biases.dtype
        changed += not mx.array_equal(out[p].scales, q[p].scales).item()
    assert changed
    # the float model once per window; per training window and epoch a forward and a backward; validation
    assert rec["window_forwards"] == (4 + 4) + 3 * 4 * 2 + 4 * 3 and rec["top_k"] == 16
    assert 0 < rec["target_mass"] < 1


class _Stop(Exception):
    pass


class _Progress:
    """Records every update; with `stop_at`, raises _Stop once that many window forwards are done."""

    def __init__(self, stop_at=None):
        self.stop_at, self.seen = stop_at, []

    def update(self, done, total, unit):
        self.seen.append((done, total, unit))
        if self.stop_at is not None and done >= self.stop_at:
            raise _Stop


def test_progress_counts_window_forwards_to_the_total(nemotron_moe):
    st = DistillSettings(windows=3, validation=2, epochs=2, lr=1e-3, batch=2)
    p = _Progress()
    _, rec = Distiller(load(nemotron_moe).model, _quantized(nemotron_moe), st, progress=p).run(
        _tokens(3, 0), _tokens(2, 1))
    done = [d for d, _, _ in p.seen]
    assert done == sorted(done) and p.seen[-1] == (rec["window_forwards"], rec["window_forwards"], "window forwards")
    assert rec["window_forwards"] == (3 + 2) + 3 * 3 * 2 + 2 * 3


def test_no_epoch_better_keeps_the_written_values(nemotron_moe):
    (out, rec), q = _run(nemotron_moe, DistillSettings(windows=2, validation=2, epochs=1, lr=0.0, batch=2))
    assert not rec["kept"] and rec["epoch_kept"] == 0
    assert rec["validation_kl_after"] == rec["validation_kl_before"]
    assert all(out[p] is q[p] for p in q)


def test_distillation_is_deterministic(nemotron_moe):
    st = DistillSettings(windows=4, validation=2, epochs=1, lr=1e-2, batch=2, seed=3)
    q = _quantized(nemotron_moe)
    (a, ra), _ = _run(nemotron_moe, st, q)
    (b, rb), _ = _run(nemotron_moe, st, q)
    assert ra["epochs_run"] == rb["epochs_run"]
    for p in ra["tensors"]:
        assert mx.array_equal(a[p].scales, b[p].scales).item() and mx.array_equal(a[p].biases, b[p].biases).item()


def _teacher(path):
    """The float model's targets streamed block by block (as convert gives them)."""
    lm = load(path)
    anatomy = describe(lm.model, lm.config)
    return lambda x, k, bs, on: streamed_targets(lm.runner(retain=False), anatomy, x, k, bs, on)


def test_streamed_targets_are_the_whole_models(nemotron_moe):
    x = mx.array(_tokens(3, 2))
    whole = targets(load(nemotron_moe).model, x, k=16, bs=2)
    ticks = []
    got = _teacher(nemotron_moe)(x, 16, 2, ticks.append)
    assert got.ids.shape == whole.ids.shape == (3, 32, 16)
    # the same top 16 (argpartition's order aside) with the same log-probabilities and rest
    assert mx.allclose(mx.sort(got.logp, axis=-1), mx.sort(whole.logp, axis=-1), atol=1e-4).item()
    assert mx.allclose(got.rest, whole.rest, atol=1e-4).item()
    assert mx.array_equal(mx.sort(got.ids, axis=-1), mx.sort(whole.ids, axis=-1)).item()
    assert sum(ticks) == pytest.approx(3)   # progress in windows


def test_a_quantized_student_learns_what_the_float_one_does(nemotron_moe):
    """The written model's quantized kernels differentiated in its scales and biases, each layer checkpointed:
    the same run (targets, losses, the values kept) as the float model with the weights dequantized, to float
    rounding."""
    import mlx.nn as nn

    st = DistillSettings(windows=4, validation=2, epochs=2, lr=1e-3, batch=2, top_k=16)
    q = _quantized(nemotron_moe)
    train, valid = _tokens(4, 0), _tokens(2, 1)
    ref, rec_f = Distiller(load(nemotron_moe).model, q, st).run(train, valid)
    student = load(nemotron_moe).model
    nn.quantize(student, class_predicate=lambda p, m: f"{p}.weight" in q and q[f"{p}.weight"].fmt.quant_kwargs())
    got, rec_q = Distiller(student, q, DistillSettings(**{**st.__dict__, "student": "quantized"}),
                           teacher=_teacher(nemotron_moe)).run(train, valid)
    assert rec_q["student"] == "quantized" and rec_q["kept"] == rec_f["kept"] and rec_q["epoch_kept"] == rec_f["epoch_kept"]
    # its layers run again inside the backward (only their inputs kept): a fourth forward per training window
    assert rec_q["window_forwards"] == rec_f["window_forwards"] + 4 * 2
    for a, b in zip(rec_q["epochs_run"], rec_f["epochs_run"]):
        assert a["validation_kl"] == pytest.approx(b["validation_kl"], rel=1e-3)
    assert rec_q["validation_kl_before"] == pytest.approx(rec_f["validation_kl_before"], rel=1e-4)
    for p in rec_f["tensors"]:
        assert got[p].wq is q[p].wq
        assert mx.allclose(got[p].scales.astype(mx.float32), ref[p].scales.astype(mx.float32), rtol=2e-2).item()
    with pytest.raises(ValueError, match="teacher"):
        Distiller(student, q, DistillSettings(student="quantized"))


def test_the_quantized_students_layers_hold_their_values_only_while_they_run(nemotron_moe):
    """Each layer's tuned values are made inside its own run (and its backward's rerun), then the layer has its
    written arrays again: one layer's values are held at a time, not the model's. The gradient still reaches
    every tuned tensor inside the layers."""
    import mlx.nn as nn

    q = _quantized(nemotron_moe)
    student = load(nemotron_moe).model
    nn.quantize(student, class_predicate=lambda p, m: f"{p}.weight" in q and q[f"{p}.weight"].fmt.quant_kwargs())
    d = Distiller(student, q, DistillSettings(student="quantized", top_k=16), teacher=_teacher(nemotron_moe))
    d._become_student()
    inside, _ = d._by_layer
    assert inside and sum(len(v) for v in inside.values()) > 0
    params = {p: {"a": v["a"] + 0.01, "c": v["c"] + 0.1} for p, v in d.sb.zeros().items()}
    x = mx.array(_tokens(2, 0))
    loss, g = mx.value_and_grad(lambda ps: d._logits(x, ps, cast=False, train=True).square().mean())(params)
    mx.eval(loss, g)
    modules = dict(student.named_modules())
    for paths in inside.values():
        for p in paths:
            m = modules[p.rsplit(".", 1)[0]]
            assert m.scales is q[p].scales and m.biases is q[p].biases
            assert float(mx.abs(g[p]["a"]).sum().item()) > 0 and float(mx.abs(g[p]["c"]).sum().item()) > 0


def _full_kl(zt, zs):
    lp = zt - mx.logsumexp(zt, axis=-1, keepdims=True)
    lq = zs - mx.logsumexp(zs, axis=-1, keepdims=True)
    return (mx.exp(lp) * (lp - lq)).sum(axis=-1)


def test_topk_kl_is_the_full_kl_with_the_whole_vocabulary_and_a_lower_bound_below_it():
    rng = np.random.default_rng(0)
    zt, zs = (mx.array(rng.normal(size=(2, 5, 40)).astype(np.float32) * 3) for _ in range(2))
    full = _full_kl(zt, zs)

    class Fixed:   # a "model" whose logits for window i (its tokens all i) are zt[i]
        def __call__(self, x):
            return zt[x[:, 0]]

    tokens = mx.broadcast_to(mx.arange(2)[:, None], (2, 5))
    whole = targets(Fixed(), tokens, k=40, bs=1)
    np.testing.assert_allclose(np.array(topk_kl(whole, zs)), np.array(full), rtol=1e-4, atol=1e-6)
    some = targets(Fixed(), tokens, k=8, bs=2)
    assert some.ids.shape == (2, 5, 8)
    # the kept log-probabilities are the 8 largest, and with the rest they make a distribution
    top = np.sort(np.array(zt - mx.logsumexp(zt, axis=-1, keepdims=True)), axis=-1)[..., -8:]
    np.testing.assert_allclose(np.sort(np.array(some.logp), axis=-1), top, rtol=1e-5)
    mass = np.exp(np.array(some.logp)).sum(-1) + np.exp(np.array(some.rest))
    np.testing.assert_allclose(mass, 1.0, rtol=1e-5)
    part = np.array(topk_kl(some, zs))
    assert (part <= np.array(full) + 1e-6).all() and (part > 0).all()
    assert float(topk_kl(some, zt).max()) < 1e-5   # the same logits: no divergence


def test_batch_bounded_by_logits_bytes():
    st = DistillSettings(batch=8)
    assert batch_size(st, 256, 6144) == 8
    assert batch_size(st, 512, 131072) == 1
    with pytest.raises(ValueError):
        DistillSettings(windows=0)
    with pytest.raises(ValueError):
        DistillSettings(top_k=0)


def test_patch_overwrites_in_place_and_refuses_another_layout(tmp_path):
    layout = [("a.scales", (2, 3), "bfloat16"), ("a.weight", (2, 4), "uint32"), ("b", (5,), "float32")]
    w = ShardWriter(tmp_path, layout, max_shard_bytes=40)
    arrays = {"a.scales": mx.ones((2, 3), dtype=mx.bfloat16), "a.weight": mx.zeros((2, 4), dtype=mx.uint32),
              "b": mx.arange(5, dtype=mx.float32)}
    for k, v in arrays.items():
        w.put(k, v)
    w.close()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    new = mx.array([[1.5, 2.5, -3.0], [0.25, 4.0, 8.0]], dtype=mx.bfloat16)
    patch(tmp_path, {"a.scales": new})
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    got = {k: mx.load(str(tmp_path / f))[k] for k, f in index.items()}
    assert mx.array_equal(got["a.scales"], new).item()
    assert mx.array_equal(got["b"], arrays["b"]).item() and mx.array_equal(got["a.weight"], arrays["a.weight"]).item()
    with pytest.raises(MixqError, match="a.scales"):
        patch(tmp_path, {"a.scales": mx.ones((2, 3), dtype=mx.float32)})
    with pytest.raises(MixqError, match="b"):
        patch(tmp_path, {"b": mx.ones((4,), dtype=mx.float32)})


def test_an_interrupted_distillation_resumes_to_the_same_values(nemotron_moe, tmp_path):
    """The targets and each finished epoch are kept: a run stopped in its second epoch, run again, skips the
    float model's forwards and the first epoch and ends where an uninterrupted run ends."""
    st = DistillSettings(windows=4, validation=2, epochs=3, lr=1e-2, batch=2, seed=5)
    q = _quantized(nemotron_moe)
    train, valid = _tokens(4, 0), _tokens(2, 1)
    whole, rec = Distiller(load(nemotron_moe).model, q, st).run(train, valid)

    first_epoch_end = (4 + 2) + 2 + 3 * 4 + 2   # targets, the starting validation, one epoch and its validation
    with pytest.raises(_Stop):
        Distiller(load(nemotron_moe).model, q, st, progress=_Progress(first_epoch_end + 1)).run(
            train, valid, state_dir=tmp_path / "state")
    p = _Progress()
    again, rec2 = Distiller(load(nemotron_moe).model, q, st, progress=p).run(train, valid, state_dir=tmp_path / "state")
    assert p.seen[0][0] > first_epoch_end   # neither the targets nor the first epoch ran again
    assert {k: v for k, v in rec2.items() if k != "seconds"} == {k: v for k, v in rec.items() if k != "seconds"}
    for path in rec["tensors"]:
        assert mx.array_equal(whole[path].scales, again[path].scales).item()
        assert mx.array_equal(whole[path].biases, again[path].biases).item()
    # other settings (another key): nothing of that state is used
    p = _Progress()
    Distiller(load(nemotron_moe).model, q, DistillSettings(windows=4, validation=2, epochs=1, lr=1e-3, batch=2),
              progress=p).run(train, valid, state_dir=tmp_path / "state")
    assert p.seen[0][0] <= 2
