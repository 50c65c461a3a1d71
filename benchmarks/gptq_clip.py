"""GPTQ's per-group range search (`mixq.quant.gptq.CLIP_GRID`), measured per tensor kind.

For each model: one calibration pass (16 x 256 tokens; Hessians and the float reference), then a uniform
layout (default 4:64) rounded with GPTQ (a) with every group's range min..max as mlx does, (b) with the
range search on every tensor, (c) with it on one tensor kind only, each kind in turn, and mlx-lm's
round-to-nearest for scale. KL to the float model on the calibration windows and on 16 x 256 held-out
tokens, as a ratio to (a). Where the gain comes from matters: the demos' embeddings are half their weights.

Usage: python benchmarks/gptq_clip.py [--models demo demo-moe] [--format 4:64]
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
from mixq.quant.gptq import CLIP_GRID
from mixq.quant.rounding import Rounding
from mixq.quant.plan import uniform_formats
from mixq.quant.sensitivity import kind_of
from mixq.quant.sweep import Stream


class KindClip(Rounding):
    """The range search on one tensor kind (or all, `only=None`), min..max elsewhere."""

    def __init__(self, hessians, kinds: dict, only: str | None):
        super().__init__(hessians, clip=CLIP_GRID)
        self.kinds, self.only = kinds, only

    def _solve(self, path, w, fmts):
        self.clip = CLIP_GRID if self.only is None or self.kinds.get(path) == self.only else (1.0,)
        return super()._solve(path, w, fmts)


def measure(model: str, spec: str) -> None:
    lm = load(model, compute_dtype=None, lazy=True)
    anatomy = describe(lm.model, lm.config)
    win = calibration.make_windows(calibration.load_documents(None), lm.tokenizer, n_samples=16, seq_len=256, seed=0)
    runner = lm.runner(retain=True)
    rounding, hessians = make_rounding(anatomy, "gptq")
    cal = Calibration(runner, anatomy, win.tokens, list(DEFAULT_CANDIDATES) + [Format("float")], rounding=rounding,
                      hessians=hessians, method="estimate", target_bpw=4.5, source_dtypes=lm.source_dtypes, seed=0)
    cal.run()   # Hessians of every tensor (blocks', embedding's Fisher, head's) and the float reference
    fmts, _ = uniform_formats(anatomy, Format.parse(spec))
    kinds = {t.path: kind_of(t.path, t.module_type) for t in anatomy.tensors}
    names = sorted({kinds[p] for p, f in fmts.items() if f.is_quantized and p in hessians})
    streams = [Stream("min..max", fmts, Rounding(hessians, clip=(1.0,))),
               Stream("all kinds", fmts, KindClip(hessians, kinds, None))]
    streams += [Stream(k, fmts, KindClip(hessians, kinds, k)) for k in names]
    streams.append(Stream("mlx-lm round-to-nearest", fmts, None))
    t0 = time.perf_counter()
    calib, _ = evaluate(runner, anatomy, win.tokens, streams, gptq_paths=hessians.paths, hessians=hessians,
                        references=cal.references)
    held_win = calibration.heldout_windows(lm.tokenizer, n_samples=16, seq_len=256)
    held, _ = evaluate(runner, anatomy, held_win.tokens, streams, gptq_paths=hessians.paths, hessians=hessians)
    a, b = calib["min..max"]["kl_mean"], held["min..max"]["kl_mean"]
    print(f"\n== {model}, uniform {spec}, GPTQ; range search grid {CLIP_GRID[0]}..{CLIP_GRID[-1]} "
          f"({len(CLIP_GRID)} ratios); {time.perf_counter() - t0:.0f} s")
    print(f"{'range search on':<26} {'calib KL':>9} {'x min..max':>10} {'held-out KL':>12} {'x min..max':>10}")
    for s in streams:
        c, h = calib[s.name]["kl_mean"], held[s.name]["kl_mean"]
        print(f"{s.name:<26} {c:>9.5f} {c / a:>10.3f} {h:>12.5f} {h / b:>10.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["demo", "demo-moe"])
    ap.add_argument("--format", default="4:64")
    args = ap.parse_args()
    for m in args.models:
        measure(m, args.format)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
