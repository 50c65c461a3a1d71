"""GPTQ on the quantized model's own inputs (`mixq convert --gptq-inputs quantized`, the default) against the
float model's (`--gptq-inputs float`, the code before), measured on held-out text.

For each model and budget (uniform 4:64's bpw, and 5.5 bpw; `--bpw` for others): the default convert both ways.
The sensitivity stage and so the plan are the same in both (the estimates take the float inputs), so the
difference is what GPTQ fits each written layer to. Prints held-out KL (16 x 256 tokens), the ratio own / float,
the write stage's and the whole convert's seconds. Then, per tensor kind, at the first budget: held-out KL of the
float-input model with only that kind's tensors from the own-input one (`hessian_windows.by_kind`; a kind's
own-input rounding assumes the rest rounded too, so the shares overlap).

Usage: python benchmarks/gptq_inputs.py [--models demo demo-moe] [--bpw 4.5 ...] [--no-kinds]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import mixq  # noqa: F401  (fast BLAS before mlx)
from hessian_windows import by_kind
from mixq.core.anatomy import describe
from mixq.core.formats import Format
from mixq.core.modelio import load
from mixq.quant.convert import ConvertOptions, convert
from mixq.quant.plan import plan_bytes, uniform_formats


def run(model: str, budgets: list | None, work: Path, kinds: bool) -> list[dict]:
    lm = load(model, compute_dtype=None, lazy=True)
    anatomy = describe(lm.model, lm.config)
    if not budgets:
        u4, _ = uniform_formats(anatomy, Format.parse("4:64"))
        budgets = [plan_bytes(anatomy, lm.source_dtypes, u4) * 8 / anatomy.mlx_lm_params, 5.5]
    rows = []
    for j, bpw in enumerate(budgets):
        kl = {}
        for inputs in ("float", "quantized"):
            out = work / f"{Path(model).name}-{bpw:.3f}-{inputs}"
            r = convert(ConvertOptions(model=model, out=str(out), target_bpw=bpw, force=True, progress=False,
                                       compare="none", gptq_inputs=inputs))
            kl[inputs] = r["comparison"][0]["kl_mean"]
            rows.append({"model": model, "bpw": r["plan"]["achieved_bpw"], "inputs": inputs, "kl": kl[inputs],
                         "ratio": kl[inputs] / kl["float"], "total_s": r["seconds"]["total"],
                         "write_s": r["seconds"].get("evaluate and write", r["seconds"].get("write"))})
            x = rows[-1]
            print(f"{Path(model).name:<10} {x['bpw']:>6.3f} bpw | GPTQ inputs {inputs:<9} | held-out KL "
                  f"{x['kl']:.6f} ({x['ratio']:.3f}x) | write {x['write_s']:.1f} s, convert {x['total_s']:.1f} s",
                  flush=True)
        if j == 0 and kinds:
            by_kind(lm, anatomy, work / f"{Path(model).name}-{bpw:.3f}-float",
                    work / f"{Path(model).name}-{bpw:.3f}-quantized")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["demo", "demo-moe"])
    ap.add_argument("--bpw", type=float, nargs="*", help="budgets (default: uniform 4:64's bpw and 5.5)")
    ap.add_argument("--no-kinds", action="store_true", help="skip the per-kind attribution")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mixq-inputs-") as work:
        for m in args.models:
            run(m, args.bpw, Path(work), not args.no_kinds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
