"""`mixq convert [MODEL] -o OUT --target-bpw B`: measured mixed-precision quantization, verified."""

from __future__ import annotations

import json
import sys

from mixq.quant.convert import ConvertOptions, convert


def add_arguments(p) -> None:
    p.add_argument("model", nargs="?", default="demo",
                   help="local model directory, hub id, or demo / demo-moe (default: demo)")
    p.add_argument("-o", "--out", help="output directory (default: <model>-mixq-<bpw>bpw)")
    p.add_argument("--target-bpw", type=float, default=4.5,
                   help="hard ceiling on bits per weight, mlx-lm's definition (default 4.5)")
    p.add_argument("--candidates", help="formats to choose from, e.g. 3:32,4:64,6:64,mxfp4 "
                                        "(BITS:GROUP affine, mxfp4, nvfp4, mxfp8, float), or 'all' for every format")
    p.add_argument("--calibration", help="calibration text: .jsonl ({text} or {messages}) or .txt "
                                         "(default: the built-in mix)")
    p.add_argument("--samples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--hessian-samples", type=int, default=64,
                   help="windows GPTQ's second moments are taken over: the calibration windows and more drawn "
                        "for them alone, run through the float blocks in the write sweep (default 64; "
                        "<= --samples: the calibration windows only)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-samples", type=int, default=16,
                   help="held-out windows the written model is checked on (default 16)")
    p.add_argument("--compare", default="4:64",
                   help="baselines measured beside it on held-out text: formats (4:64, 4:32, mxfp4, ...) and "
                        "mlx-lm recipes (mixed_4_6, ...), comma-separated, or none (default 4:64)")
    p.add_argument("--rounding", choices=("gptq", "rtn"), default="gptq",
                   help="how weights are rounded to affine formats: gptq (error-compensating, against "
                        "calibration second moments; default) or rtn (round to nearest, like mlx-lm)")
    p.add_argument("--gptq-inputs", choices=("auto", "quantized", "float"), default="auto",
                   help="the inputs GPTQ's written layers are fitted on: quantized (the written model's own, "
                        "layer after layer, matched to the float model's outputs), float (the float model's "
                        "inputs, as the sensitivity estimates use; less memory), or auto (quantized where the "
                        "run fits in the memory available with it; default)")
    p.add_argument("--sensitivity", help="reuse a sensitivity.json measured with the same settings")
    p.add_argument("--sensitivity-method", choices=("estimate", "exact"), default="estimate",
                   help="estimate (default): per-position Fisher estimates from one backward pass, calibrated per "
                        "tensor kind on a small exact subset; exact: every (tensor, format) pair measured")
    p.add_argument("--dry-run", action="store_true",
                   help="print every tensor with its candidates and bytes, the feasible bpw range and the memory "
                        "the run needs, then exit")
    p.add_argument("--stream-weights", choices=("auto", "on", "off"), default="auto",
                   help="read each block's weights from disk when a pass needs them instead of keeping the model "
                        "in memory (auto: when the model would not leave ample room)")
    p.add_argument("--refine", action="store_true",
                   help="tune every block's scales and biases (GPTQ's codes kept) so the quantized block reproduces "
                        "the float block's outputs; off by default: held-out KL 0.95x on the demos for 1-2x more "
                        "convert time (benchmarks/refine_blockwise.py)")
    p.add_argument("--distill", action="store_true",
                   help="after writing, tune every scale and bias end to end on the KL from the float model (codes "
                        "kept; windows held aside pick the epoch kept); off by default: held-out KL ~0.8x on the "
                        "demo for many forwards (benchmarks/distill_vs_dwq.py)")
    p.add_argument("--distill-windows", type=int, default=128, help="training windows for --distill (default 128)")
    p.add_argument("--distill-epochs", type=int, default=4, help="epochs for --distill (default 4)")
    p.add_argument("--distill-student", default="auto", choices=("auto", "float", "quantized"),
                   help="how --distill runs the model it tunes: float (weights dequantized in float32, 5 bytes a "
                        "parameter; fastest on a CPU), quantized (the written model's kernels, about its size), "
                        "or auto: float where it fits in memory (default)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _table(report: dict) -> str:
    lines = [f"{'quant':<18} {'bpw':>6} {'MB':>7} {'KL mean':>9} {'KL p99':>9} {'top-1':>7} {'ppl':>8}"]
    for r in report["comparison"]:
        lines.append(f"{r['name']:<18} {r['bpw']:>6.3f} {r['bytes'] / 1e6:>7.2f} {r['kl_mean']:>9.5f} "
                     f"{r['kl_p99']:>9.5f} {r['top1']:>7.3f} {r['ppl']:>8.3f}")
    lines.append(f"{'float':<18} {'':>6} {'':>7} {'':>9} {'':>9} {'':>7} {report['comparison'][0]['float_ppl']:>8.3f}")
    return "\n".join(lines)


def run(args) -> int:
    opts = ConvertOptions(
        model=args.model, out=args.out, target_bpw=args.target_bpw, candidates=args.candidates,
        calibration=args.calibration, samples=args.samples, hessian_samples=args.hessian_samples,
        seq_len=args.seq_len, seed=args.seed,
        heldout_samples=args.heldout_samples, compare=args.compare,
        rounding=args.rounding, gptq_inputs=args.gptq_inputs, sensitivity_method=args.sensitivity_method, dry_run=args.dry_run,
        stream_weights=args.stream_weights, refine=args.refine, distill=args.distill,
        distill_windows=args.distill_windows, distill_epochs=args.distill_epochs,
        distill_student=args.distill_student,
        sensitivity=args.sensitivity, force=args.force, progress=not args.quiet,
        command=["mixq", "convert", *sys.argv[2:]] if sys.argv[1:2] == ["convert"] else [],
    )
    report = convert(opts)
    if report.get("dry_run"):
        print(json.dumps(report["preflight"], indent=2, sort_keys=True) if args.json else report["text"])
        return 0
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    plan, cost = report["plan"], report["sensitivity_cost"]
    print(f"wrote {report['out']}  ({plan['achieved_bpw']:.4f} bpw, target {plan['target_bpw']}, "
          f"{report['disk_bytes'] / 1e6:.2f} MB of weights on disk; "
          f"verified with mlx_lm.load: {report['verify']['modules_checked']} modules)")
    print(f"sensitivity ({report['sensitivity_method']}): {cost['measurements']} (tensor, format) pairs, "
          f"{cost['exact_measurements']} measured exactly; {cost['total_block_forward_equivalents']:.0f} block-forward "
          f"equivalents (exact pass {cost['exact_pass_block_forward_equivalents']:.0f}, naive sweep "
          f"{cost['naive_block_forward_equivalents']:.0f}), {cost['total_seconds']} s")
    fit = report.get("calibration_fit")
    if fit:
        print("calibration (exact / estimate, per kind): " + ", ".join(
            f"{k} x{v['c']:.2f} (n={v['n']})" for k, v in fit["kinds"].items() if v["n"]) + (
            " [exact KL on {compared} of {of} positions]".format(**fit["positions"])
            if fit.get("positions", {}).get("compared", 0) < fit.get("positions", {}).get("of", 0) else ""))
    rnd = report["rounding"]
    on = f", fitted to the {rnd['inputs']} inputs" if rnd.get("inputs") else ""
    print(f"rounding: {rnd['method']}{on} ({', '.join(f'{n} {k}' for k, n in rnd['tensors'].items() if n)})")
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()))
    measured = plan["measured_kl_calibration"]
    print(f"KL on calibration: predicted {plan['predicted_kl']:.5f}, " + (
        f"measured {measured:.5f}" if measured is not None else "not measured (no rival; held-out text below)")
          + ("  [refined: " + report["refinement"]["reason"] + "]" if report["refinement"]["applied"] else ""))
    dist = report.get("distillation")
    if dist:
        print(f"distillation ({dist['method']}): validation KL {dist['validation_kl_before']:.5f} -> "
              f"{dist['validation_kl_after']:.5f} (" + (f"epoch {dist['epoch_kept']} of {dist['epochs']} kept"
              if dist["kept"] else f"none of {dist['epochs']} epochs beat the written values: kept") + "), held-out KL "
              f"{dist['heldout_kl_before']:.5f} -> {dist['heldout_kl_after']:.5f}, {dist['window_forwards']} "
              f"window forwards, {dist['student']} student, {dist['seconds']} s")
    skipped = report["refinement"].get("not_measured")
    if skipped:
        print("not measured against the plan (" + skipped["reason"] + "): " + ", ".join(
            f"uniform {k} predicted KL {v:.5f}" for k, v in skipped["predicted_kl"].items()))
    tuning = report.get("tuning")
    if tuning:
        print(f"tuning ({tuning['method']}): calibration KL {tuning['kl_calibration_before']:.5f} -> "
              f"{tuning['kl_calibration_after']:.5f}, {tuning['blocks_kept']} of {tuning['blocks']} blocks kept, "
              f"{tuning['block_forwards']} block-forward equivalents, {tuning['seconds']} s")
    print()
    print("held-out text, against the float model:")
    print(_table(report))
    return 0
