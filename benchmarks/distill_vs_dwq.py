"""End-to-end distillation (`mixq convert --distill`) against GPTQ-only mixq and mlx-lm's DWQ, on held-out text.

For each model and budget (uniform 4:64's bpw, and 5.5 bpw): `mixq convert --distill` (its report holds the
held-out KL of the written model before and after the distillation: GPTQ-only mixq and distilled mixq, the
same bytes), and mlx-lm's DWQ (`mlx_lm.quant.dwq.dwq_quantize`, via refine_blockwise.dwq) of the uniform
format of that size (4:64; 5:64 for 5.5 bpw), trained on the same windows mixq distils on, measured on the
same held-out windows. Prints KL, the ratios and seconds.

Usage: python benchmarks/distill_vs_dwq.py [--models demo demo-moe] [--windows 128] [--epochs 4]
           [--dwq-lr 1e-5] [--dwq-epochs 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import mixq  # noqa: F401  (fast BLAS before mlx)
from mixq.core.anatomy import describe
from mixq.core.formats import Format
from mixq.core.modelio import load
from mixq.quant import calibration
from mixq.quant.convert import ConvertOptions, convert
from mixq.quant.distill import DistillSettings
from mixq.quant.evaluate import evaluate
from mixq.quant.plan import plan_bytes, uniform_formats
from mixq.quant.sweep import Stream

sys.path.insert(0, str(Path(__file__).parent))
from refine_blockwise import dwq  # noqa: E402


def run(model: str, args, work: Path) -> list[dict]:
    lm = load(model, compute_dtype=None, lazy=True)
    anatomy = describe(lm.model, lm.config)
    src = next(lm.source_dtypes[t.path] for t in anatomy.tensors if t.module_type == "Linear")
    u4, _ = uniform_formats(anatomy, Format.parse("4:64"))
    budgets = [("4:64", plan_bytes(anatomy, lm.source_dtypes, u4) * 8 / anatomy.mlx_lm_params), ("5:64", 5.5)]
    st = DistillSettings(windows=args.windows, epochs=args.epochs)
    win = calibration.make_windows(calibration.load_documents(None), lm.tokenizer,
                                   n_samples=st.windows + st.validation, seq_len=256, seed=1)
    held = calibration.heldout_windows(lm.tokenizer, n_samples=16, seq_len=256)
    runner = lm.runner(retain=True)
    rows = []
    for spec, bpw in budgets:
        t0 = time.perf_counter()
        r = convert(ConvertOptions(model=model, out=str(work / f"{model}-{bpw:.3f}"), target_bpw=bpw, force=True,
                                   progress=False, compare="none", distill=True, distill_windows=args.windows,
                                   distill_epochs=args.epochs))
        mixq_s = time.perf_counter() - t0
        d = r["distillation"]
        for lr in args.dwq_lr:
            qd, dwq_s = dwq(model, Format.parse(spec), win.tokens[st.validation:], lr, src, epochs=args.dwq_epochs)
            fmts, _ = uniform_formats(anatomy, Format.parse(spec))
            got, _ = evaluate(runner, anatomy, held.tokens, [Stream("dwq", {}, quantized=qd)])
            rows.append({"model": model, "bpw": r["plan"]["achieved_bpw"], "gptq": d["heldout_kl_before"],
                         "distilled": d["heldout_kl_after"], "dwq": got["dwq"]["kl_mean"], "dwq_lr": lr,
                         "dwq_spec": spec, "dwq_bpw": plan_bytes(anatomy, lm.source_dtypes, fmts) * 8 /
                         anatomy.mlx_lm_params, "distill_s": d["seconds"], "convert_s": mixq_s, "dwq_s": dwq_s,
                         "window_forwards": d["window_forwards"], "epoch_kept": d["epoch_kept"]})
            x = rows[-1]
            print(f"{model:<9} {x['bpw']:>6.3f} | mixq GPTQ {x['gptq']:.5f}  distilled {x['distilled']:.5f} "
                  f"({x['distilled'] / x['gptq']:.3f}x, epoch {x['epoch_kept']}, {x['distill_s']:.0f} s of "
                  f"{x['convert_s']:.0f} s) | DWQ {spec} lr {lr:g} ({x['dwq_bpw']:.3f} bpw) {x['dwq']:.5f} "
                  f"({x['dwq_s']:.0f} s) | distilled / DWQ {x['distilled'] / x['dwq']:.3f}", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["demo", "demo-moe"])
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--dwq-lr", type=lambda s: [float(x) for x in s.split(",")], default=[1e-5])
    ap.add_argument("--dwq-epochs", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mixq-distill-") as work:
        for m in args.models:
            run(m, args, Path(work))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
