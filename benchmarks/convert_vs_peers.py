"""mixq convert against uniform quants, mlx-lm's mixed_4_6 recipe and mlx-lm's dynamic_quant, in one run; the
sensitivity estimator against the exact pass; whole-convert wall time against dynamic_quant.

For each model (demo, demo-moe): measure mixq's sensitivities twice on the same calibration windows, with
the default estimator (`estimate`) and with the exact pass (`exact`); report the Spearman rank correlation
of the two over every (tensor, format) pair and their costs (block-forward equivalents and seconds). Then,
for each peer, set mixq's ceiling to the peer's measured bits per weight (mlx-lm's definition, exact byte
accounting) and compare held-out KL vs the float model: the peer (mlx-lm's rounding), mixq's plan from the
estimates and mixq's plan from the exact pass (both GPTQ-rounded against the calibration windows).

Wall time: `mixq convert` with its defaults on a random-weight llama with SmolLM-135M's shapes (hidden 576,
30 layers, 9/3 heads, intermediate 1536, vocab 49152, tied) against mlx-lm's dynamic_quant functions
(estimate_sensitivities, estimate_threshold, quantize_model, save) on the same calibration windows; and
the README's quick-start convert on the demo model.

dynamic_quant's CLI fetches data from the hub, so its functions are called with mixq's local calibration
windows: estimate_sensitivities on the float32 model (CPU), estimate_threshold on the stored-dtype model.

Usage: python benchmarks/convert_vs_peers.py [--models demo demo-moe] [--samples 16] [--seq-len 256]
       [--candidates all|default|SPEC] [--skip-wall] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mixq  # noqa: F401  (fast BLAS before mlx)
import numpy as np

from mixq.core.anatomy import describe
from mixq.core.formats import DEFAULT_CANDIDATES, Format, parse_candidates, tensor_bytes
from mixq.core.modelio import load
from mixq.quant import calibration
from mixq.quant.calibpass import Calibration, make_rounding
from mixq.quant.evaluate import summary
from mixq.quant.plan import candidate_items, make_plan, plan_bytes, plan_formats, recipe_formats, uniform_formats
from mixq.quant.sweep import ForwardSweep, Stream


def dynamic_quant_formats(name, anatomy, tokens, target_bpw, low=(4, 64), high=(5, 64)):
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold

    t0 = time.perf_counter()
    f32 = load(name)
    sens = dict(estimate_sensitivities(model=f32.model, data=tokens, low_bits=low[0], low_group_size=low[1],
                                       high_bits=high[0], high_group_size=high[1], batch_size=4))
    src = load(name, compute_dtype=None)
    threshold = estimate_threshold(model=src.model, sensitivities=sens, target_bpw=target_bpw, low_bits=low[0],
                                   low_group_size=low[1], high_bits=high[0], high_group_size=high[1])
    fmts = {t.path: Format("affine", *(high if sens.get(t.module, float("-inf")) > threshold else low))
            for t in candidate_items(anatomy)}
    return fmts, time.perf_counter() - t0


def measure(lm, anatomy, tokens, cands, method, target):
    rounding, H = make_rounding(anatomy, "gptq")
    cal = Calibration(lm.runner(), anatomy, tokens, cands, rounding=rounding, hessians=H, method=method,
                      target_bpw=target, source_dtypes=lm.source_dtypes)
    t0 = time.perf_counter()
    doc = cal.run()
    doc["wall"] = time.perf_counter() - t0
    return doc, rounding, H


def rounded_plans(lm, anatomy, tokens, plans: dict, rounding, H) -> dict:
    """Each plan's tensors rounded as the convert writes them (GPTQ against the calibration windows)."""
    got = {name: {} for name in plans}
    streams = [Stream(name, fmts, rounding) for name, fmts in plans.items()]

    def keep(stream, path, q):
        got[stream.name][path] = q

    ForwardSweep(lm.runner(), anatomy, tokens, gptq_paths=set(H.paths)).run(streams, grams=True, hessians=H,
                                                                            on_rounded=keep)
    return got


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b)[0])


def run_model(name: str, args) -> dict:
    lm = load(name, compute_dtype=None, lazy=True)
    anatomy = describe(lm.model, lm.config)
    params = anatomy.mlx_lm_params
    win = calibration.make_windows(calibration.load_documents(None), lm.tokenizer, n_samples=args.samples,
                                   seq_len=args.seq_len, seed=0)
    held = calibration.heldout_windows(lm.tokenizer, n_samples=args.heldout, seq_len=args.seq_len)
    cands = list(DEFAULT_CANDIDATES) if args.candidates == "default" else parse_candidates(args.candidates)
    if Format("float") not in cands:
        cands.append(Format("float"))

    def bpw(fmts):
        return plan_bytes(anatomy, lm.source_dtypes, fmts) * 8 / params

    peers = {"uniform 4:64": uniform_formats(anatomy, Format("affine", 4, 64))[0],
             "mixed_4_6": recipe_formats(anatomy, lm.model, "mixed_4_6")}
    peers["dynamic_quant"], dq_s = dynamic_quant_formats(name, anatomy, win.tokens, bpw(peers["mixed_4_6"]))
    est, rounding, H = measure(lm, anatomy, win.tokens, cands, "estimate", bpw(peers["uniform 4:64"]))
    exact, _, _ = measure(lm, anatomy, win.tokens, cands, "exact", bpw(peers["uniform 4:64"]))
    pairs = [(p, f) for p, v in exact["tensors"].items() for f in v["costs"] if f != "float"]
    x = np.array([exact["tensors"][p]["costs"][f] for p, f in pairs])
    raw = np.array([est["tensors"][p]["estimates"][f] for p, f in pairs])
    cal = np.array([est["tensors"][p]["costs"][f] for p, f in pairs])
    rows, kinds = [], {}
    for peer, fmts in peers.items():
        target = bpw(fmts)
        plans = {"est": plan_formats(make_plan(anatomy, est, cands, target, lm.source_dtypes)),
                 "exact": plan_formats(make_plan(anatomy, exact, cands, target, lm.source_dtypes))}
        q = rounded_plans(lm, anatomy, win.tokens, plans, rounding, H)
        streams = [Stream("peer", fmts)] + [Stream(k, {}, quantized=v) for k, v in q.items()]
        res = ForwardSweep(lm.runner(), anatomy, held.tokens).run(streams)
        s = {k: summary(v) for k, v in res.streams.items()}
        rows.append({"peer": peer, "bpw": target, "peer_kl": s["peer"]["kl_mean"], "peer_top1": s["peer"]["top1"],
                     "est_bpw": bpw(plans["est"]), "est_kl": s["est"]["kl_mean"], "est_top1": s["est"]["top1"],
                     "exact_bpw": bpw(plans["exact"]), "exact_kl": s["exact"]["kl_mean"]})
        if peer == "uniform 4:64":  # where the estimate plan spends its bytes, by tensor kind
            for p, f in plans["est"].items():
                t = anatomy.tensor(p)
                d = kinds.setdefault(est["tensors"][p]["kind"], {"params": 0, "bits": 0, "est_kl": 0.0})
                d["params"] += t.params
                d["bits"] += tensor_bytes(t.shape, f, lm.source_dtypes[p]) * 8
                d["est_kl"] += est["tensors"][p]["costs"].get(str(f), 0.0)
    # rounding only: mixq's GPTQ on the uniform 4:64 layout (how much is rounding, how much allocation)
    u4 = peers["uniform 4:64"]
    q = rounded_plans(lm, anatomy, win.tokens, {"gptq 4:64": u4}, rounding, H)
    only = summary(ForwardSweep(lm.runner(), anatomy, held.tokens).run(
        [Stream("g", {}, quantized=q["gptq 4:64"])]).streams["g"])["kl_mean"]
    return {"model": name, "params": params, "rows": rows, "rounding_only_4_64_kl": only, "kinds": kinds,
            "spearman_raw": spearman(raw, x), "spearman": spearman(cal, x),
            "log_ratio_sd": float(np.std(np.log(cal / x))),
            "calibration": est["calibration"], "est_cost": est["cost"], "exact_cost": exact["cost"],
            "est_wall": est["wall"], "exact_wall": exact["wall"], "dynamic_quant_seconds": dq_s}


DQ_CHILD = """
import json, sys, time, tempfile
import mixq
import mlx.core as mx
from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold
from mlx_lm.utils import quantize_model, save, compute_bits_per_weight
from mixq.core.modelio import load
from mixq.quant import calibration
t0 = time.perf_counter()
f32 = load(sys.argv[1])
win = calibration.make_windows(calibration.load_documents(None), f32.tokenizer, n_samples=16, seq_len=256, seed=0)
sens = dict(estimate_sensitivities(model=f32.model, data=win.tokens, low_bits=4, low_group_size=64, high_bits=5,
                                   high_group_size=64, batch_size=4))
del f32
src = load(sys.argv[1], compute_dtype=None)
thr = estimate_threshold(model=src.model, sensitivities=sens, target_bpw=float(sys.argv[2]), low_bits=4,
                         low_group_size=64, high_bits=5, high_group_size=64)
pred = lambda p, m: {"bits": 5, "group_size": 64} if sens.get(p, -1e30) > thr else hasattr(m, "to_quantized")
model, config = quantize_model(src.model, dict(src.config), group_size=64, bits=4, quant_predicate=pred)
bpw = compute_bits_per_weight(model)
save(sys.argv[3], src.path, model, src.tokenizer, config)
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "bpw": bpw}))
"""

MIXQ_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from mixq.quant.convert import ConvertOptions, convert
r = convert(ConvertOptions(model=sys.argv[1], out=sys.argv[2], target_bpw=float(sys.argv[3]), force=True,
                           progress=False))
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "bpw": r["plan"]["achieved_bpw"],
                              "stages": r["seconds"]}))
"""


def _child(code: str, *argv) -> dict:
    p = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    return json.loads(next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))[7:])


def wall_times(work: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from convert_scale import SLICES, build

    llama = build(SLICES["llama135m"], work / "llama135m")
    out = {}
    dq = _child(DQ_CHILD, llama, 5.0, work / "llama-dq")
    mq = _child(MIXQ_CHILD, llama, work / "llama-mixq", dq["bpw"])
    out["llama135m"] = {"dynamic_quant": dq, "mixq": mq, "ratio": mq["seconds"] / dq["seconds"]}
    t0 = time.perf_counter()
    p = subprocess.run(["mixq", "convert", "-o", str(work / "demo-mixq-4.5bpw"), "--force", "--quiet"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    out["quick_start_seconds"] = time.perf_counter() - t0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description="mixq convert vs peers")
    ap.add_argument("--models", nargs="+", default=["demo", "demo-moe"])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--candidates", default="all",
                    help="mixq candidate formats (default: all; 'default' for convert's default set)")
    ap.add_argument("--skip-wall", action="store_true", help="skip the wall-time comparisons")
    ap.add_argument("--work", default=None, help="where the wall-time runs write (default: a temp dir)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    results = {"models": [run_model(m, args) for m in args.models]}
    for r in results["models"]:
        c, d = r["est_cost"], r["exact_cost"]
        print(f"\n== {r['model']}  ({r['params'] / 1e6:.2f}M params)")
        print(f"sensitivity: estimate {c['total_block_forward_equivalents']:.0f} block-forward equivalents, "
              f"{r['est_wall']:.1f} s ({c['exact_measurements']} pairs measured exactly) | exact pass "
              f"{d['total_block_forward_equivalents']:.0f}, {r['exact_wall']:.1f} s ({d['measurements']} pairs) | "
              f"ratio {c['total_block_forward_equivalents'] / d['total_block_forward_equivalents']:.3f} in "
              f"block-forwards, {r['est_wall'] / r['exact_wall']:.3f} in seconds")
        print(f"estimate vs exact over all {d['measurements']} pairs: Spearman {r['spearman']:.4f} "
              f"(uncalibrated {r['spearman_raw']:.4f}), sd of log(estimate / exact) {r['log_ratio_sd']:.3f}")
        print("calibration: " + ", ".join(f"{k} x{v['c']:.2f} (n={v['n']})" for k, v in
                                          r["calibration"]["kinds"].items()))
        print(f"{'peer':<14} {'bpw':>6} {'peer KL':>9} {'est bpw':>8} {'est KL':>9} {'exact bpw':>9} {'exact KL':>9}"
              f" | {'est/exact':>9} {'est/peer':>9} {'est/u4':>7}")
        u4 = r["rows"][0]["peer_kl"]
        for x in r["rows"]:
            print(f"{x['peer']:<14} {x['bpw']:>6.3f} {x['peer_kl']:>9.5f} {x['est_bpw']:>8.3f} {x['est_kl']:>9.5f} "
                  f"{x['exact_bpw']:>9.3f} {x['exact_kl']:>9.5f} | {x['est_kl'] / x['exact_kl']:>9.3f} "
                  f"{x['est_kl'] / x['peer_kl']:>9.3f} {x['est_kl'] / u4:>7.3f}")
        print(f"rounding only (uniform 4:64 layout, mixq's GPTQ): KL {r['rounding_only_4_64_kl']:.5f} = "
              f"{r['rounding_only_4_64_kl'] / u4:.3f}x uniform 4:64; + allocation: {r['rows'][0]['est_kl'] / u4:.3f}x")
        print("estimate plan at uniform 4:64's size, by tensor kind: " + ", ".join(
            f"{k} {v['bits'] / v['params']:.2f} bpw ({v['est_kl']:.2g} KL)" for k, v in sorted(r["kinds"].items())))
        print(f"dynamic_quant's sensitivities and threshold: {r['dynamic_quant_seconds']:.1f} s")
    if not args.skip_wall:
        work = Path(args.work or tempfile.mkdtemp(prefix="mixq-wall-"))
        results["wall"] = w = wall_times(work)
        ll = w["llama135m"]
        print(f"\n== wall time, random-weight llama with SmolLM-135M's shapes, 16 x 256 calibration tokens")
        print(f"mlx-lm dynamic_quant (sensitivities, threshold, quantize, save): {ll['dynamic_quant']['seconds']:.1f} s "
              f"-> {ll['dynamic_quant']['bpw']:.3f} bpw")
        print(f"mixq convert (defaults, same bpw): {ll['mixq']['seconds']:.1f} s -> {ll['mixq']['bpw']:.3f} bpw; "
              f"ratio {ll['ratio']:.2f}; stages " + ", ".join(f"{k} {v}" for k, v in ll["mixq"]["stages"].items()))
        print(f"README quick start (mixq convert -o demo-mixq-4.5bpw): {w['quick_start_seconds']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
