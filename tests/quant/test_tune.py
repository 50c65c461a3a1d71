"""Block-wise tuning of scales and biases (`mixq.quant.tune`): the codes stay, the block loss it minimises
goes down or the rounded values are kept, the result is plain affine data in the source dtype, and it is
deterministic."""

import mlx.core as mx
import numpy as np

from mixq.core.anatomy import describe
from mixq.core.formats import Format
from mixq.core.modelio import load
from mixq.quant.plan import uniform_formats
from mixq.quant.sweep import ForwardSweep, Stream
from mixq.quant.tune import BlockTuner, TuneSettings


def _run(path, settings, tokens):
    lm = load(path, compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    r = lm.runner()
    fmts = uniform_formats(a, Format.parse("4:64"))[0]
    tuner = BlockTuner(r, settings)
    seen = {"plain": {}, "tuned": {}}

    def on_rounded(stream, path, q):
        seen[stream.name][path] = q

    res = ForwardSweep(r, a, tokens, batch_size=2).run(
        [Stream("plain", fmts), Stream("tuned", fmts, tuner=tuner)], on_rounded=on_rounded)
    return tuner, seen, res, lm


def _tokens():
    return mx.array(np.random.default_rng(0).integers(1, 500, size=(4, 32)).astype(np.int32))


def test_tuning_keeps_codes_lowers_its_loss_and_writes_source_dtype(nemotron_moe):
    tuner, seen, res, lm = _run(nemotron_moe, TuneSettings(steps=6, lr=1e-2), _tokens())
    blocks = tuner.to_dict()["blocks"]
    assert blocks and all(b["loss_after"] < b["loss_before"] for b in blocks if b["kept"])
    assert any(b["kept"] for b in blocks)
    kept = {b["block"] for b in blocks if b["kept"]}
    changed = 0
    for p, q in seen["tuned"].items():
        plain = seen["plain"][p]
        assert mx.array_equal(q.wq, plain.wq).item()   # the integer codes are GPTQ's / mlx's
        assert q.scales.dtype == plain.scales.dtype and q.biases.dtype == plain.biases.dtype
        if not mx.array_equal(q.scales, plain.scales).item():
            changed += 1
            assert int(p.split(".")[2]) in kept   # only kept blocks' values move
        # stock dequantization reads it
        mx.dequantize(q.wq, q.scales, q.biases, group_size=q.fmt.group_size, bits=q.fmt.bits)
    assert changed > 0
    # a block the tuning does not improve keeps the rounded arrays themselves
    tuner0, seen0, _, _ = _run(nemotron_moe, TuneSettings(steps=2, lr=0.0), _tokens())
    assert not any(b["kept"] for b in tuner0.blocks)
    for p, q in seen0["tuned"].items():
        assert all(mx.array_equal(x, y).item() for x, y in zip((q.scales, q.biases), (seen0["plain"][p].scales,
                                                                                       seen0["plain"][p].biases)))
    # the tuned stream is what the sweep ran: its KL differs from the plain one's
    assert not np.array_equal(res.streams["tuned"]["kl"], res.streams["plain"]["kl"])


def test_tuning_is_deterministic(nemotron_dense):
    a = _run(nemotron_dense, TuneSettings(steps=3, lr=1e-2), _tokens())[1]["tuned"]
    b = _run(nemotron_dense, TuneSettings(steps=3, lr=1e-2), _tokens())[1]["tuned"]
    assert a.keys() == b.keys()
    for p in a:
        assert mx.array_equal(a[p].scales, b[p].scales).item() and mx.array_equal(a[p].biases, b[p].biases).item()
