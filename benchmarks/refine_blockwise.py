"""Block-wise tuning of scales and biases (`mixq.quant.tune`) on top of GPTQ, measured on held-out text.

For each model: one calibration pass (N x 256 tokens; Hessians and the float reference), then a uniform
layout (default 4:64) rounded with GPTQ, alone and with each tuning setting (steps / learning rate / inputs:
"stream" = the quantized model's own inputs to the block, "float" = the float model's), and mlx-lm's
round-to-nearest for scale. KL to the float model on the calibration windows and on 16 x 256 held-out tokens,
as a ratio to GPTQ alone; the tuning's seconds, block-forward equivalents and summed block loss.

Usage: python benchmarks/refine_blockwise.py [--models demo demo-moe] [--format 4:64] [--samples 16]
           [--settings 16/1e-3/stream,32/2e-3/stream,32/2e-3/float]
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


def measure(model: str, spec: str, samples: int, settings: list[TuneSettings]) -> None:
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
    tuners = {f"tuned {s.steps}/{s.lr:g}/{s.inputs}": BlockTuner(runner, s) for s in settings}
    kept: dict = {name: {} for name in tuners}

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
    held_streams = [Stream(s.name, {}, quantized=kept[s.name]) if s.name in kept else s for s in streams]
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
        print(f"{s.name:<26} {c:>9.5f} {c / a:>7.3f} {h:>12.5f} {h / b:>7.3f}{extra}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["demo", "demo-moe"])
    ap.add_argument("--format", default="4:64")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows of 256 tokens")
    ap.add_argument("--settings", default="16/1e-3/stream,32/2e-3/stream,32/2e-3/float",
                    help="tuning settings, STEPS/LR[/INPUTS] separated by commas")
    args = ap.parse_args()
    for m in args.models:
        measure(m, args.format, args.samples, parse_settings(args.settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
