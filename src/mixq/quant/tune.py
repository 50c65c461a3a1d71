"""Block-wise tuning of the written scales and biases against the float model (`--refine`).

GPTQ fixes each group's integer codes and its scale and bias from the columns it has seen; what a block
then computes differs from the float block by errors that add up across its tensors and blocks. Here, block
by block in the write sweep, the codes stay as rounded and every affine tensor's per-group scale and bias
are tuned (Adam) so that the quantized block, run on the *quantized* model's inputs to it, reproduces the
float block's outputs on the float model's inputs: mean squared error over the calibration windows. The
block then runs with the tuned values, so later blocks see (and correct) what is left. Memory: one block's
codes (a byte a weight), its float32 weights while a step runs, and the calibration state the sweep holds.

The result is plain mlx affine data in the source dtype (tuned values are cast to it before they are
measured), so stock `mlx_lm.load` reads it. A block whose tuned loss is not below its starting loss keeps
the rounded values. Deterministic from the seed (the order of batches is the only random choice).

Measured (benchmarks/refine_blockwise.py, uniform 4:64 with GPTQ, 16 x 256 calibration tokens, held-out KL
as a ratio to GPTQ alone): demo 1.003 (32 steps, lr 2e-3) though its calibration KL fell to 0.78: with so few
windows the stream's inputs are fitted, not the model; with 64 windows 0.975. demo-moe 0.952. Tuning on the
float model's inputs instead generalises no better (0.98-0.99). In the default convert (`--refine`): demo
0.952x, demo-moe 0.946x held-out KL, for 1-2x more convert time. Far from the 30 % the DWQ literature
reports with millions of tokens; the end-to-end stage is `--distill` (mixq.quant.distill).
Tried, not landed: AutoRound's rounding offsets (a per-weight v in [-0.5, 0.5] from the float weight's
position between the written levels, sign steps of 5e-3, beside these scales and biases; 128 windows, 100
steps a block, the best of 8 checks kept): demo uniform 4:64 held-out 0.904x GPTQ against 0.924x for scales
and biases alone on the same windows and steps (16 windows: 1.04x, fitted), for ~7% more time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mixq.quant.scalebias import ScaleBias
from mixq.quant.scalebias import tunable as affine

TUNE_VERSION = "blockwise-scale-bias-v1"


@dataclass
class TuneSettings:
    steps: int = 32        # optimizer steps a block (one batch of calibration windows each)
    lr: float = 2e-3       # Adam, in units of the group's own scale (scales: relative change; biases: steps)
    seed: int = 0
    inputs: str = "stream"  # what the quantized block runs on: the stream's own inputs, or the float model's

    def to_dict(self) -> dict:
        return {"method": TUNE_VERSION, "steps": self.steps, "lr": self.lr, "seed": self.seed, "inputs": self.inputs}

    def __post_init__(self):
        if self.inputs not in ("stream", "float") or self.steps < 0 or self.lr < 0:
            raise ValueError(f"tuning: inputs stream or float, steps and lr >= 0 (got {self})")


@dataclass
class BlockTuner:
    """Called by the sweep for the stream it tunes: (block, path -> QuantizedWeight, the stream's inputs,
    the float block's outputs) -> path -> QuantizedWeight. Keeps a record per block."""

    runner: object
    settings: TuneSettings = field(default_factory=TuneSettings)
    blocks: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.settings.to_dict(), "blocks": self.blocks,
                "seconds": round(sum(b["seconds"] for b in self.blocks), 2),
                "block_forwards": sum(b["block_forwards"] for b in self.blocks),
                "loss_before": sum(b["loss_before"] for b in self.blocks),
                "loss_after": sum(b["loss_after"] for b in self.blocks)}

    def __call__(self, i: int, qs: dict, xs: list, ys: list, xf: list | None = None) -> dict:
        t0 = time.perf_counter()
        tunable = affine(qs)
        if not tunable or not xs:
            return qs
        if self.settings.inputs == "float" and xf is not None:
            xs = xf
        out, rec = _tune_block(self.runner, i, qs, tunable, xs, ys, self.settings)
        rec.update(block=i, seconds=round(time.perf_counter() - t0, 3), tensors=sorted(tunable))
        self.blocks.append(rec)
        return out


def _tune_block(runner, i: int, qs: dict, tunable: dict, xs: list, ys: list, st: TuneSettings):
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_unflatten

    prefix = runner.layer_prefix(i)
    layer = runner.layers[i]
    compute = runner.compute or mx.float32
    sb = ScaleBias(tunable)

    def set_weights(params, cast: bool):
        """The tunable tensors' weights from the codes and (scale, bias); the others stay as swapped in."""
        layer.update(tree_unflatten([(p[len(prefix):], w) for p, w in sb.weights(params, cast, compute)]))

    def mse(x, y):
        d = runner.block(i, x).astype(mx.float32) - y.astype(mx.float32)
        return (d * d).mean()

    def loss_fn(params, x, y):
        set_weights(params, cast=False)
        return mse(x, y)

    def total(params) -> float:
        set_weights(params, cast=True)
        return sum(float(mse(x, y).item()) * x.shape[0] for x, y in zip(xs, ys)) / sum(x.shape[0] for x in xs)

    params = sb.zeros()
    # the block's own parameters are put back on exit, whatever the steps wrote into it
    with runner.swap(i, {p: q.full(compute) for p, q in qs.items()}):
        before = total(params)
        opt = optim.Adam(learning_rate=st.lr)
        grad = mx.value_and_grad(loss_fn)
        order = np.random.default_rng([st.seed, i]).permutation(max(st.steps, 1)) % len(xs)
        for k in range(st.steps):
            j = int(order[k])
            _, g = grad(params, xs[j], ys[j])
            params = opt.apply_gradients(g, params)
            mx.eval(params, opt.state)
        after = total(params)
    # a backward counted as two forwards; the losses before and after run every batch once
    rec = {"loss_before": before, "loss_after": after, "steps": st.steps, "kept": after < before,
           "block_forwards": 3 * st.steps + 2 * len(xs)}
    if not after < before:
        return qs, rec
    return {**qs, **sb.quantized(params)}, rec
