"""Block-wise tuning of scales and biases (`mixq.quant.tune`) on top of GPTQ, measured on held-out text.

For each model: one calibration pass (N x 256 tokens; Hessians and the float reference), then a uniform
layout (default 4:64) rounded with GPTQ, alone and with each tuning setting (steps / learning rate / inputs:
"stream" = the quantized model's own inputs to the block, "float" = the float model's), and mlx-lm's
round-to-nearest for scale, and mlx-lm's DWQ (`mlx_lm.quant.dwq.dwq_quantize`: mlx-lm's uniform quant with
its scales and biases trained against the float model's logits; the same calibration windows, batch 4,
its default learning rate 1e-6 unless --dwq-lr). KL to the float model on the calibration windows and on
16 x 256 held-out tokens, as a ratio to GPTQ alone; the tuning's seconds, block-forward equivalents and summed block loss.

Usage: python benchmarks/refine_blockwise.py [--models demo demo-moe] [--format 4:64] [--samples 16]
           [--settings 16/1e-3/stream,32/2e-3/stream,32/2e-3/float] [--dwq-lr 1e-6,1e-5]
"""

from __future__ import annotations

import argparse
import time

import mixq  # noqa: F401  (fast BLAS before mlx)
from mixq.core.anatomy import describe
from mixq.core.formats import DEFAULT_CANDIDATES, Format
from mixq.core.modelio import load
from mixq.quant import calibration
from mixq.quant.calibpass import Calibration, make_rounding
from mixq.quant.evaluate import evaluate
from mixq.quant.plan import uniform_formats
from mixq.quant.sweep import Stream
from mixq.quant.tune import BlockTuner, TuneSettings


def parse_settings(spec: str) -> list[TuneSettings]:
    out = []
    for item in spec.split(","):
        steps, lr, *inputs = item.split("/")
        out.append(TuneSettings(steps=int(steps), lr=float(lr), inputs=inputs[0] if inputs else "stream"))
    return out


def dwq(model: str, spec: Format, tokens, lr: float, source_dtype: str, init: dict | None = None,
        epochs: int = 1) -> tuple[dict, float]:
    """mlx-lm's DWQ of its uniform `spec` quant on the windows `tokens` -> path -> QuantizedWeight, seconds.
    `init` (path -> QuantizedWeight, e.g. mixq's GPTQ rounding): the student starts from those arrays
    instead of mlx-lm's round-to-nearest; `epochs`: passes over the windows (mlx-lm's DWQ makes one)."""
    import copy

    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm import load as lm_load
    from mlx_lm.quant.dwq import dwq_quantize
    from mlx_lm.utils import quantize_model

    from mixq.core.modelio import resolve_model
    from mixq.quant.qweight import QuantizedWeight

    teacher, _, config = lm_load(str(resolve_model(model)), return_config=True)
    stored = getattr(mx, source_dtype)   # the scales and biases are written in the source dtype
    if mx.default_device() == mx.cpu:   # mlx's CPU gather_mm (MoE) is float32 only
        from mixq.core.modelio import cast_floats

        cast_floats(teacher, mx.float32)
        source_dtype = "float32"
    student = copy.deepcopy(teacher)
    quantize_model(student, copy.deepcopy(config), group_size=spec.group_size, bits=spec.bits)
    if init:
        mods = dict(student.named_modules())
        for path, q in init.items():
            m = mods[path[:-len(".weight")]]
            m.update({"weight": q.wq, "scales": q.scales.astype(m.scales.dtype),
                      "biases": q.biases.astype(m.biases.dtype)})
    data = [(np.array(tokens[i]).tolist(), 0) for i in range(tokens.shape[0])] * epochs
    t0 = time.perf_counter()
    mx.random.seed(0)
    np.random.seed(0)
    dwq_quantize(student, lambda batch, i, split: teacher(batch), optim.Adam(learning_rate=lr, bias_correction=True),
                 data, data[:4], batch_size=4, max_seq_length=tokens.shape[1] + 1, seed=0,
                 dtype=getattr(mx, source_dtype))
    out = {}
    for name, m in student.named_modules():
        if hasattr(m, "scales") and getattr(m, "mode", "affine") == "affine":
            out[f"{name}.weight"] = QuantizedWeight(fmt=Format.affine(m.bits, m.group_size), wq=m.weight,
                                                    scales=m.scales.astype(stored), biases=m.biases.astype(stored),
                                                    cols=int(m.weight.shape[-1]) * 32 // m.bits)
    return out, time.perf_counter() - t0


def measure(model: str, spec: str, samples: int, settings: list[TuneSettings], dwq_lrs: list[float],
            gptq_dwq: list[tuple[float, int]] = ()) -> None:
    lm = load(model, compute_dtype=None, lazy=True)
    anatomy = describe(lm.model, lm.config)
    win = calibration.make_windows(calibration.load_documents(None), lm.tokenizer, n_samples=samples, seq_len=256,
                                   seed=0)
    runner = lm.runner(retain=True)
    rounding, hessians = make_rounding(anatomy, "gptq")
    cal = Calibration(runner, anatomy, win.tokens, list(DEFAULT_CANDIDATES) + [Format("float")], rounding=rounding,
                      hessians=hessians, method="estimate", target_bpw=4.5, source_dtypes=lm.source_dtypes, seed=0)
    cal.run()
    fmts, _ = uniform_formats(anatomy, Format.parse(spec))
    tuners_seconds: dict = {}
    tuners = {f"tuned {s.steps}/{s.lr:g}/{s.inputs}": BlockTuner(runner, s) for s in settings}
    kept: dict = {name: {} for name in [*tuners, "gptq"]}

    def on_rounded(stream, path, q):
        if stream.name in kept:
            kept[stream.name][path] = q

    streams = [Stream("gptq", fmts, rounding)] + [Stream(n, fmts, rounding, tuner=t) for n, t in tuners.items()]
    streams.append(Stream("mlx-lm round-to-nearest", fmts, None))
    t0 = time.perf_counter()
    calib, _ = evaluate(runner, anatomy, win.tokens, streams, gptq_paths=hessians.paths, hessians=hessians,
                        references=cal.references, on_rounded=on_rounded)
    seconds = time.perf_counter() - t0
    # held out: the tuned values as written (no tuning on held-out text)
    held_streams = [Stream(s.name, {}, quantized=kept[s.name]) if s.name in tuners else s for s in streams]
    src = lm.source_dtypes[next(p for p, f in fmts.items() if f.is_quantized)]
    for lr in dwq_lrs:
        qd, secs = dwq(model, Format.parse(spec), win.tokens, lr, src)
        name = f"mlx-lm DWQ lr {lr:g}"
        held_streams.append(Stream(name, {}, quantized=qd))
        streams.append(Stream(name, {}, quantized=qd))
        tuners_seconds[name] = secs
    for lr, epochs in gptq_dwq:   # mlx-lm's DWQ started from mixq's GPTQ arrays
        init = {p: q for p, q in kept["gptq"].items() if q.fmt.mode == "affine" and q.biases is not None}
        qd, secs = dwq(model, Format.parse(spec), win.tokens, lr, src, init=init, epochs=epochs)
        name = f"GPTQ + DWQ lr {lr:g} x{epochs}"
        held_streams.append(Stream(name, {}, quantized=qd))
        streams.append(Stream(name, {}, quantized=qd))
        tuners_seconds[name] = secs
    if dwq_lrs or gptq_dwq:   # the calibration KL of the DWQ quants (on the windows it was trained on)
        more, _ = evaluate(runner, anatomy, win.tokens, [s for s in streams if "DWQ" in s.name],
                           references=cal.references)
        calib.update(more)
    held_win = calibration.heldout_windows(lm.tokenizer, n_samples=16, seq_len=256)
    held, _ = evaluate(runner, anatomy, held_win.tokens, held_streams, gptq_paths=hessians.paths, hessians=hessians)
    a, b = calib["gptq"]["kl_mean"], held["gptq"]["kl_mean"]
    print(f"\n== {model}, uniform {spec}, GPTQ; calibration {samples} x 256 tokens; sweep {seconds:.0f} s")
    print(f"{'rounding':<26} {'calib KL':>9} {'x gptq':>7} {'held-out KL':>12} {'x gptq':>7} {'seconds':>8} "
          f"{'block fw':>9} {'block loss':>17} {'kept':>6}")
    for s in streams:
        c, h = calib[s.name]["kl_mean"], held[s.name]["kl_mean"]
        extra = ""
        if s.name in tuners:
            d = tuners[s.name].to_dict()
            extra = (f" {d['seconds']:>8.1f} {d['block_forwards']:>9} {d['loss_before']:>8.4g}->{d['loss_after']:<8.4g}"
                     f" {sum(x['kept'] for x in d['blocks']):>3}/{len(d['blocks'])}")
        if s.name in tuners_seconds:
            extra = f" {tuners_seconds[s.name]:>8.1f}"
        print(f"{s.name:<26} {c:>9.5f} {c / a:>7.3f} {h:>12.5f} {h / b:>7.3f}{extra}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["demo", "demo-moe"])
    ap.add_argument("--format", default="4:64")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows of 256 tokens")
    ap.add_argument("--settings", default="16/1e-3/stream,32/2e-3/stream,32/2e-3/float",
                    help="tuning settings, STEPS/LR[/INPUTS] separated by commas")
    ap.add_argument("--dwq-lr", default="1e-6", help="mlx-lm DWQ learning rates, comma-separated ('' for none)")
    ap.add_argument("--gptq-dwq", default="", help="mlx-lm DWQ started from mixq's GPTQ arrays, LR/EPOCHS "
                    "separated by commas (e.g. 1e-5/4,3e-5/8)")
    args = ap.parse_args()
    lrs = [float(x) for x in args.dwq_lr.split(",") if x.strip()]
    gd = [(float(a), int(b)) for a, b in (x.split("/") for x in args.gptq_dwq.split(",") if x.strip())]
    for m in args.models:
        measure(m, args.format, args.samples, parse_settings(args.settings) if args.settings else [], lrs, gd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
