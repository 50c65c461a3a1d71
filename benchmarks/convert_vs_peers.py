"""mixq convert against uniform quants, mlx-lm's mixed_4_6 recipe and mlx-lm's dynamic_quant, in one run.

For each model: measure mixq's sensitivities once, then for each comparison target set mixq's ceiling to
the peer's measured bits per weight (mlx-lm's definition, exact byte accounting) and compare held-out KL
vs the float model. Also reports the sensitivity pass cost against a naive full-forward sweep (the naive
sweep is timed on a sample of measurements and extrapolated; block-forward counts are exact).

dynamic_quant's CLI fetches data from the hub, so its functions are called with the same local
calibration windows mixq uses: estimate_sensitivities on the float32 model (CPU), estimate_threshold on
the model in its stored dtype (so its bits-per-weight accounting is the real one).

mixq rounds affine formats with GPTQ by default (as `mixq convert` does); `--rounding rtn` measures
mixq's allocation alone with mlx's round-to-nearest. The "rounding only" line applies mixq's GPTQ to the
uniform 4:64 layout, to show how much of the gain is rounding and how much allocation.

Usage: python benchmarks/convert_vs_peers.py [--models demo demo-moe] [--samples 16] [--seq-len 256]
       [--candidates all|default|SPEC] [--rounding gptq|rtn]
"""

from __future__ import annotations

import argparse
import json
import time

import mixq  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx

from mixq.core.anatomy import describe
from mixq.core.formats import DEFAULT_CANDIDATES, Format, parse_candidates
from mixq.core.modelio import load
from mixq.quant import calibration, hessian
from mixq.quant.evaluate import Evaluator
from mixq.quant.gptq import RTN
from mixq.quant.plan import make_plan, plan_bytes, plan_formats, recipe_formats, uniform_formats
from mixq.quant.sensitivity import candidate_items, measure


def dynamic_quant_formats(name, lm, anatomy, tokens, target_bpw, low=(4, 64), high=(5, 64)):
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold

    t0 = time.perf_counter()
    sens = estimate_sensitivities(model=lm.model, data=tokens, low_bits=low[0], low_group_size=low[1],
                                  high_bits=high[0], high_group_size=high[1], batch_size=4)
    sens = dict(sens)
    src = load(name, compute_dtype=None)
    threshold = estimate_threshold(model=src.model, sensitivities=sens, target_bpw=target_bpw, low_bits=low[0],
                                   low_group_size=low[1], high_bits=high[0], high_group_size=high[1])
    fmts = {}
    for t in candidate_items(anatomy):
        hi = sens.get(t.module, float("-inf")) > threshold
        fmts[t.path] = Format("affine", *(high if hi else low))
    return fmts, time.perf_counter() - t0


def naive_sweep_seconds(lm, anatomy, tokens, sample: int = 8) -> float:
    """Seconds per measurement when every measurement re-runs the whole model on all windows."""
    from mixq.core.formats import quantize_dequantize
    from mixq.core.metrics import kl_per_token

    modules = dict(lm.model.named_modules())
    items = candidate_items(anatomy)[:sample]
    ref = [lm.model(tokens[s:s + 8]) for s in range(0, tokens.shape[0], 8)]
    mx.eval(ref)
    t0 = time.perf_counter()
    for t in items:
        m = modules[t.module]
        name = t.path.rsplit(".", 1)[1]
        w = getattr(m, name)
        setattr(m, name, quantize_dequantize(w.astype(getattr(mx, lm.source_dtypes[t.path])), Format("affine", 4, 64)))
        for i, s in enumerate(range(0, tokens.shape[0], 8)):
            logits = lm.model(tokens[s:s + 8])
            mx.eval(kl_per_token(ref[i], logits).mean())
        setattr(m, name, w)
    return (time.perf_counter() - t0) / len(items)


def run_model(name: str, args) -> dict:
    lm = load(name)
    anatomy = describe(lm.model, lm.config)
    params = anatomy.mlx_lm_params
    docs = calibration.load_documents(None)
    win = calibration.make_windows(docs, lm.tokenizer, n_samples=args.samples, seq_len=args.seq_len, seed=0)
    held = calibration.heldout_windows(lm.tokenizer, n_samples=args.heldout, seq_len=args.seq_len)
    cands = list(DEFAULT_CANDIDATES) if args.candidates == "default" else parse_candidates(args.candidates)
    if Format("float") not in cands:
        cands.append(Format("float"))
    t0 = time.perf_counter()
    rounding = RTN
    if args.rounding == "gptq":
        rounding = hessian.gptq_rounding(lm.model, anatomy, win.tokens, progress=False)
    hess_s = time.perf_counter() - t0
    sens = measure(lm.model, anatomy, win.tokens, cands, key={"bench": name},
                   source_dtypes=lm.source_dtypes, rounding=rounding, progress=False)
    naive_s = naive_sweep_seconds(lm, anatomy, win.tokens)
    ev = Evaluator(lm.model, held.tokens, lm.source_dtypes)

    def bpw(fmts):
        return plan_bytes(anatomy, lm.source_dtypes, fmts) * 8 / params

    peers = {"uniform 4:64": uniform_formats(anatomy, Format("affine", 4, 64))[0],
             "mixed_4_6": recipe_formats(anatomy, lm.model, "mixed_4_6")}
    dq_target = bpw(peers["mixed_4_6"])
    peers["dynamic_quant"], dq_s = dynamic_quant_formats(name, lm, anatomy, win.tokens, dq_target)
    rows = []
    for peer, fmts in peers.items():
        target = bpw(fmts)
        plan = make_plan(anatomy, sens, cands, target, lm.source_dtypes)
        p, m = ev.measure(fmts), ev.measure(plan_formats(plan), rounding=rounding)
        rows.append({"peer": peer, "peer_bpw": target, "peer_kl": p["kl_mean"], "peer_p99": p["kl_p99"],
                     "mixq_bpw": plan["achieved_bpw"], "mixq_kl": m["kl_mean"], "mixq_p99": m["kl_p99"],
                     "ratio": m["kl_mean"] / p["kl_mean"], "peer_top1": p["top1"], "mixq_top1": m["top1"]})
    only = ev.measure(peers["uniform 4:64"], rounding=rounding)["kl_mean"] if rounding is not RTN else None
    c = sens["cost"]
    return {"model": name, "params": params, "rows": rows, "float_ppl": ev.measure(None)["float_ppl"],
            "rounding": rounding.settings(), "rounding_only_4_64_kl": only,
            "sensitivity": {**c, "hessian_seconds": round(hess_s, 1), "naive_seconds_est": round(naive_s * c["measurements"], 1),
                            "dynamic_quant_seconds": round(dq_s, 1)}}


def main() -> int:
    ap = argparse.ArgumentParser(description="mixq convert vs peers")
    ap.add_argument("--models", nargs="+", default=["demo", "demo-moe"])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--candidates", default="all",
                    help="mixq candidate formats (default: all; 'default' for convert's default set)")
    ap.add_argument("--rounding", choices=("gptq", "rtn"), default="gptq",
                    help="how mixq rounds affine formats (default gptq, as mixq convert)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    results = [run_model(m, args) for m in args.models]
    for r in results:
        s = r["sensitivity"]
        print(f"\n== {r['model']}  ({r['params'] / 1e6:.2f}M params, float held-out ppl {r['float_ppl']:.3f})")
        print(f"sensitivity pass: {s['measurements']} measurements, {s['block_forwards']} block-forwards vs "
              f"{s['naive_block_forwards']} for a naive sweep (x{s['naive_block_forwards'] / s['block_forwards']:.2f}); "
              f"{s['seconds']} s vs ~{s['naive_seconds_est']} s naive (extrapolated from 8 timed); "
              f"hessians {s['hessian_seconds']} s; rounding {r['rounding']['method']}")
        print(f"{'peer':<14} {'bpw':>6} {'KL mean':>9} {'KL p99':>8} {'top1':>6} | {'mixq bpw':>8} {'KL mean':>9} "
              f"{'KL p99':>8} {'top1':>6} | {'mixq/peer KL':>12}")
        for x in r["rows"]:
            print(f"{x['peer']:<14} {x['peer_bpw']:>6.3f} {x['peer_kl']:>9.5f} {x['peer_p99']:>8.4f} {x['peer_top1']:>6.3f} | "
                  f"{x['mixq_bpw']:>8.3f} {x['mixq_kl']:>9.5f} {x['mixq_p99']:>8.4f} {x['mixq_top1']:>6.3f} | "
                  f"{x['ratio']:>12.3f}")
        if r["rounding_only_4_64_kl"] is not None:
            base = r["rows"][0]
            print(f"rounding only (uniform 4:64 layout, mixq's GPTQ): KL {r['rounding_only_4_64_kl']:.5f} "
                  f"= {r['rounding_only_4_64_kl'] / base['peer_kl']:.3f}x uniform 4:64; "
                  f"+ allocation: {base['ratio']:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
