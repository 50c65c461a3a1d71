"""GPTQ's second moments over more windows (`mixq convert --hessian-samples`), measured on held-out text.

For each model and budget (uniform 4:64's bpw, and 5.5 bpw): the default convert with GPTQ's Grams over the
16 calibration windows only (`--hessian-samples 16`, the code before) and over 32 / 64 / 128 windows (the
calibration ones and more drawn for the Grams alone, run through the float blocks in the write sweep). The
sensitivity stage and so the plan are the same in every run (the estimates take the calibration windows), so
the difference is GPTQ's data. Prints held-out KL (16 x 256 tokens), its ratio to the 16-window run, the
write stage's and the whole convert's seconds. Then, per tensor kind (`mixq.quant.sensitivity.kind_of`), at
uniform 4:64's bpw: held-out KL of the first run's model with only that kind's tensors from the last run's
(the gain's share each kind carries; the embedding's second moment is the backward's Fisher, unchanged).

Usage: python benchmarks/hessian_windows.py [--models demo demo-moe] [--windows 16,32,64,128]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import mixq  # noqa: F401  (fast BLAS before mlx)
from mixq.core.anatomy import describe
from mixq.core.formats import Format
from mixq.core.modelio import load
from mixq.quant import calibration
from mixq.quant.convert import ConvertOptions, convert
from mixq.quant.evaluate import WrittenModel, evaluate
from mixq.quant.plan import plan_bytes, uniform_formats
from mixq.quant.sensitivity import kind_of
from mixq.quant.sweep import Stream


def by_kind(lm, anatomy, first: Path, last: Path) -> None:
    """Held-out KL of `first`'s written model with one kind's tensors from `last`'s (same plan and formats)."""
    plan = json.loads((last / "mixq" / "plan.json").read_text())
    a, b = WrittenModel(first), WrittenModel(last)
    before, after = {p: a[p] for p in a.keys()}, {p: b[p] for p in b.keys()}
    kinds = defaultdict(list)
    for p, e in plan["tensors"].items():
        if e["rounding"] == "gptq":
            kinds[kind_of(p, "")].append(p)
    size = {t.path: t.params for t in anatomy.tensors}
    streams = [Stream("first", {}, quantized=before), Stream("last", {}, quantized=after)]
    streams += [Stream(k, {}, quantized={**before, **{p: after[p] for p in ps}}) for k, ps in kinds.items()]
    held = calibration.heldout_windows(lm.tokenizer, n_samples=16, seq_len=256)
    got, _ = evaluate(lm.runner(retain=True), anatomy, held.tokens, streams)
    u, d = got["first"]["kl_mean"], got["last"]["kl_mean"]
    print(f"  per kind ({first.name} -> {last.name}): KL {u:.6f} -> {d:.6f}")
    total = sum(size.values())
    for k, ps in sorted(kinds.items(), key=lambda kv: -sum(size[p] for p in kv[1])):
        only = got[k]["kl_mean"]
        print(f"    {k:<28} {100 * sum(size[p] for p in ps) / total:>5.1f}% of params | only it: {only:.6f} "
              f"({(u - only) / (u - d):.0%} of the gain)", flush=True)


def run(model: str, windows: list[int], work: Path) -> list[dict]:
    lm = load(model, compute_dtype=None, lazy=True)
    anatomy = describe(lm.model, lm.config)
    u4, _ = uniform_formats(anatomy, Format.parse("4:64"))
    rows = []
    for j, bpw in enumerate((plan_bytes(anatomy, lm.source_dtypes, u4) * 8 / anatomy.mlx_lm_params, 5.5)):
        base = None
        for n in windows:
            r = convert(ConvertOptions(model=model, out=str(work / f"{model}-{bpw:.3f}-{n}"), target_bpw=bpw,
                                       force=True, progress=False, compare="none", hessian_samples=n))
            kl = r["comparison"][0]["kl_mean"]
            base = kl if base is None else base
            rows.append({"model": model, "bpw": r["plan"]["achieved_bpw"], "windows": n, "kl": kl,
                         "ratio": kl / base, "total_s": r["seconds"]["total"],
                         "write_s": r["seconds"].get("evaluate and write", r["seconds"].get("write"))})
            x = rows[-1]
            print(f"{model:<9} {x['bpw']:>6.3f} bpw | Gram windows {n:>4} | held-out KL {kl:.6f} "
                  f"({x['ratio']:.3f}x) | write {x['write_s']:.1f} s, convert {x['total_s']:.1f} s", flush=True)
        if j == 0 and len(windows) > 1:
            by_kind(lm, anatomy, work / f"{model}-{bpw:.3f}-{windows[0]}", work / f"{model}-{bpw:.3f}-{windows[-1]}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["demo", "demo-moe"])
    ap.add_argument("--windows", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 64, 128])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mixq-grams-") as work:
        for m in args.models:
            run(m, args.windows, Path(work))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
