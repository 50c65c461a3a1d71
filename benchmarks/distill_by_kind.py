"""Where `mixq convert --distill` gains, per tensor kind: held-out KL with one kind's distilled scales and
biases and the rest as written (and the converse: every kind distilled but one).

For each model at uniform 4:64's bpw (or --bpw): the default convert without and with --distill (the same
codes, plan and bytes; the distillation changes scales and biases only), then one held-out sweep of the
float model with a quantized stream per mix: undistilled, distilled, "only K" and "all but K" for each kind
K (q_proj, in_proj, fc1, embeddings, lm_head, ...: `mixq.quant.sensitivity.kind_of`). The demos' embeddings
are about half their parameters, so this says how much of the gain comes from them.

Usage: python benchmarks/distill_by_kind.py [--models demo demo-moe] [--bpw B] [--windows 128] [--epochs 4]
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


def run(model: str, args, work: Path) -> list[dict]:
    lm = load(model, compute_dtype=None, lazy=True)
    anatomy = describe(lm.model, lm.config)
    bpw = args.bpw or plan_bytes(anatomy, lm.source_dtypes, uniform_formats(anatomy, Format.parse("4:64"))[0]) \
        * 8 / anatomy.mlx_lm_params
    common = dict(model=model, target_bpw=bpw, force=True, progress=False, compare="none")
    convert(ConvertOptions(out=str(work / "plain"), **common))
    r = convert(ConvertOptions(out=str(work / "distilled"), distill=True, distill_windows=args.windows,
                               distill_epochs=args.epochs, **common))
    plan = json.loads((work / "distilled" / "mixq" / "plan.json").read_text())
    plain, dist = WrittenModel(work / "plain"), WrittenModel(work / "distilled")
    before = {p: plain[p] for p in plain.keys()}
    after = {p: dist[p] for p in dist.keys()}
    kinds = defaultdict(list)
    for p, e in plan["tensors"].items():
        if e.get("distilled"):
            kinds[kind_of(p, "")].append(p)
    size = {t.path: t.params for t in anatomy.tensors}
    streams = [Stream("undistilled", {}, quantized=before), Stream("distilled", {}, quantized=after)]
    for k, paths in sorted(kinds.items()):
        streams.append(Stream(f"only {k}", {}, quantized={**before, **{p: after[p] for p in paths}}))
        streams.append(Stream(f"all but {k}", {}, quantized={**after, **{p: before[p] for p in paths}}))
    held = calibration.heldout_windows(lm.tokenizer, n_samples=16, seq_len=256)
    got, _ = evaluate(lm.runner(retain=True), anatomy, held.tokens, streams)
    u, d = got["undistilled"]["kl_mean"], got["distilled"]["kl_mean"]
    total = sum(size.values())
    print(f"\n{model} at {r['plan']['achieved_bpw']:.3f} bpw: held-out KL undistilled {u:.5f}, distilled {d:.5f} "
          f"({d / u:.3f}x); gain {u - d:.5f}")
    print(f"{'kind':<28} {'params %':>8} {'only K: KL':>11} {'share of gain':>14} {'all but K: KL':>14} "
          f"{'gain lost':>10}")
    rows = []
    for k, paths in sorted(kinds.items(), key=lambda kv: -sum(size[p] for p in kv[1])):
        only, but = got[f"only {k}"]["kl_mean"], got[f"all but {k}"]["kl_mean"]
        share = sum(size[p] for p in paths) / total
        rows.append({"model": model, "kind": k, "params_share": share, "only": only, "all_but": but,
                     "undistilled": u, "distilled": d})
        print(f"{k:<28} {100 * share:>7.1f}% {only:>11.5f} {(u - only) / (u - d):>13.1%} {but:>14.5f} "
              f"{(but - d) / (u - d):>9.1%}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["demo", "demo-moe"])
    ap.add_argument("--bpw", type=float, default=None, help="default: uniform 4:64's bpw")
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    for m in args.models:
        with tempfile.TemporaryDirectory(prefix="mixq-kind-") as work:
            run(m, args, Path(work))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
