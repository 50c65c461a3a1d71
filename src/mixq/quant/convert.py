"""`convert`: measure -> allocate -> check end to end -> write -> verify, as one replayable function.

Every stage leaves a JSON document: sensitivity.json (reusable, keyed by every setting that affects it),
plan.json (the choice, its size and its predicted and measured KL) and report.json (the comparison with
uniform quants of neighbouring size, timings). Output is written to a temporary sibling directory and
renamed into place only after `mlx_lm.load` has read it back and matched the plan; the sensitivity pass
streams to `OUT.mixq-work/` so an interrupted run resumes there.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mixq
from mixq.core.anatomy import describe
from mixq.core.errors import MixqError
from mixq.core.formats import DEFAULT_CANDIDATES, Format, parse_candidates, tensor_bytes
from mixq.core.modelio import check_finite, fingerprint, load
from mixq.quant import calibration, hessian
from mixq.quant.apply import quantize_in_place, verify, write_model
from mixq.quant.evaluate import Evaluator
from mixq.quant.gptq import RTN
from mixq.quant.plan import make_plan, plan_bytes, plan_formats, recipe_formats, uniform_formats
from mixq.quant.sensitivity import METHOD, candidate_items, load_sensitivity, measure

BASELINES = ("4:64", "4:32", "mixed_4_6")


@dataclass
class ConvertOptions:
    model: str = "demo"
    out: str | None = None
    target_bpw: float = 4.5
    candidates: str | None = None
    calibration: str | None = None
    samples: int = 16
    seq_len: int = 256
    seed: int = 0
    sensitivity: str | None = None
    heldout_samples: int = 32
    rounding: str = "gptq"
    force: bool = False
    progress: bool = True
    command: list[str] = field(default_factory=list)


def _versions() -> dict:
    from importlib.metadata import version

    return {"mixq": mixq.__version__, "mlx": version("mlx"), "mlx-lm": version("mlx-lm")}


def _dump(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _log(opts: ConvertOptions, msg: str) -> None:
    if opts.progress:
        print(msg, file=sys.stderr, flush=True)


def _desc(opts: ConvertOptions, text: str) -> str | None:
    return text if opts.progress else None


def convert(opts: ConvertOptions) -> dict:
    t_start = time.perf_counter()
    if not (0 < opts.target_bpw <= 32):
        raise MixqError(f"--target-bpw must be in (0, 32], got {opts.target_bpw}")
    if opts.samples < 1 or opts.seq_len < 8:
        raise MixqError("--samples must be >= 1 and --seq-len >= 8")
    out = Path(opts.out or f"{Path(str(opts.model)).name}-mixq-{opts.target_bpw:g}bpw").expanduser()
    if out.exists() and not opts.force:
        raise MixqError(f"{out} already exists (use --force to replace it)")
    if opts.rounding not in ("gptq", "rtn"):
        raise MixqError(f"--rounding must be gptq or rtn, got {opts.rounding!r}")
    candidates = parse_candidates(opts.candidates) if opts.candidates else list(DEFAULT_CANDIDATES)
    if Format("float") not in candidates:
        candidates.append(Format("float"))
    docs = calibration.load_documents(opts.calibration)

    lm = load(opts.model)
    check_finite(lm.model)
    anatomy = describe(lm.model, lm.config)
    if any(t.current for t in anatomy.tensors):
        raise MixqError(f"{opts.model} is already quantized; convert from the float model")
    windows = calibration.make_windows(docs, lm.tokenizer, n_samples=opts.samples, seq_len=opts.seq_len,
                                       seed=opts.seed)
    t0 = time.perf_counter()
    rounding = RTN
    if opts.rounding == "gptq":
        rounding = hessian.gptq_rounding(lm.model, anatomy, windows.tokens, seed=opts.seed, progress=opts.progress)
    t_hess = time.perf_counter() - t0
    key = {
        "method": METHOD, "rounding": rounding.settings(), "model": fingerprint(lm.path), "candidates": [str(c) for c in candidates],
        "calibration_sha256": windows.sha256, "samples": opts.samples, "seq_len": opts.seq_len,
        "seed": opts.seed, "compute_dtype": "float32",
    }

    work = out.with_name(out.name + ".mixq-work")
    t0 = time.perf_counter()
    if opts.sensitivity:
        sens = load_sensitivity(opts.sensitivity, key)
        _log(opts, f"sensitivity: reusing {opts.sensitivity}")
    else:
        n_items = len(candidate_items(anatomy))
        _log(opts, f"sensitivity: {n_items} tensors x {len(candidates)} candidates "
                   f"on {opts.samples} x {opts.seq_len} calibration tokens")
        sens = measure(lm.model, anatomy, windows.tokens, candidates, key=key, source_dtypes=lm.source_dtypes,
                       rounding=rounding, partial=work / "sensitivity.partial.jsonl", progress=opts.progress)
    t_sens = time.perf_counter() - t0

    plan = make_plan(anatomy, sens, candidates, opts.target_bpw, lm.source_dtypes)
    params = anatomy.mlx_lm_params

    # end to end: calibration (predicted vs measured) and held-out (reported)
    _log(opts, "measuring the plan end to end")
    calib_eval = Evaluator(lm.model, windows.tokens, lm.source_dtypes)
    mixq_calib = calib_eval.measure(plan_formats(plan), desc=_desc(opts, "plan on calibration"), rounding=rounding)
    refinement = {"applied": False}
    best_name, best_fmts, best_kl = None, None, mixq_calib["kl_mean"]
    for spec in [c for c in candidates if c.is_quantized]:
        fmts, _ = uniform_formats(anatomy, spec)
        if plan_bytes(anatomy, lm.source_dtypes, fmts) * 8 / params > opts.target_bpw:
            continue
        kl = calib_eval.measure(fmts, desc=_desc(opts, f"uniform {spec} on calibration"), rounding=rounding)["kl_mean"]
        if kl < best_kl:
            best_name, best_fmts, best_kl = f"uniform {spec}", fmts, kl
    if best_name is not None:
        # interactions made the knapsack's pick worse than a simpler plan that fits: take the simpler one
        refinement = {"applied": True, "replaced_plan_kl": mixq_calib["kl_mean"],
                      "reason": f"{best_name} measured lower calibration KL ({best_kl:.4g} < {mixq_calib['kl_mean']:.4g})"}
        for path, e in plan["tensors"].items():
            e["format"] = str(best_fmts[path])
            e["bytes"] = tensor_bytes(e["shape"], best_fmts[path], lm.source_dtypes.get(path, "float32"))
        plan["total_bytes"] = plan_bytes(anatomy, lm.source_dtypes, best_fmts)
        plan["achieved_bpw"] = plan["total_bytes"] * 8 / params
        plan["predicted_kl"] = sum(float(e["sensitivity"].get(e["format"], "nan")) for e in plan["tensors"].values())
        mixq_calib = calib_eval.measure(plan_formats(plan), rounding=rounding)
    del calib_eval

    held = calibration.heldout_windows(lm.tokenizer, n_samples=opts.heldout_samples, seq_len=opts.seq_len)
    ev = Evaluator(lm.model, held.tokens, lm.source_dtypes)
    rows = [{"name": "mixq", "bpw": plan["achieved_bpw"], "bytes": plan["total_bytes"],
             **ev.measure(plan_formats(plan), desc=_desc(opts, "held-out: mixq"), rounding=rounding)}]
    for b in BASELINES:
        if b.startswith("mixed_"):
            fmts = recipe_formats(anatomy, lm.model, b)
            fell = []
        else:
            fmts, fell = uniform_formats(anatomy, Format.parse(b))
        nbytes = plan_bytes(anatomy, lm.source_dtypes, fmts)
        rows.append({"name": b if b.startswith("mixed_") else f"uniform {b}", "bpw": nbytes * 8 / params,
                     "bytes": nbytes, "float_fallbacks": len(fell), **ev.measure(fmts, desc=_desc(opts, f"held-out: {b}"))})
    del ev

    for path, e in plan["tensors"].items():
        e["rounding"] = rounding.name_for(path, Format.parse(e["format"]))
    plan.update({
        "rounding": rounding.settings(),
        "model": {"name": str(opts.model), "fingerprint": key["model"], "model_type": anatomy.model_type,
                  "pattern": anatomy.pattern},
        "calibration": {**windows.to_dict(), "source": opts.calibration or "built-in"},
        "sensitivity_key": key,
        "predicted_kl_calibration": plan["predicted_kl"],
        "measured_kl_calibration": mixq_calib["kl_mean"],
        "measured_heldout": {k: rows[0][k] for k in ("kl_mean", "kl_p99", "top1", "ppl", "float_ppl")},
        "heldout": held.to_dict(),
        "refinement": refinement,
        "versions": _versions(),
        "command": opts.command,
    })

    # write into a temporary sibling, verify with stock mlx_lm.load, then rename into place
    tmp = out.with_name(f".{out.name}.mixq-tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        src = load(opts.model, compute_dtype=None)
        config = quantize_in_place(src.model, src.config, plan, rounding)
        write_model(src.model, config, src.path, tmp)
        del src
        _dump(plan, tmp / "mixq" / "plan.json")
        _dump(sens, tmp / "mixq" / "sensitivity.json")
        check = verify(tmp, plan)
        on_disk = sum(f.stat().st_size for f in tmp.glob("model*.safetensors"))
        rows[0]["disk_bytes"] = on_disk
        report = {
            "out": str(out), "disk_bytes": on_disk, "plan": {k: plan[k] for k in ("target_bpw", "achieved_bpw", "total_bytes",
                                                              "predicted_kl", "measured_kl_calibration")},
            "comparison": rows, "verify": check, "sensitivity_cost": sens["cost"],
            "refinement": refinement, "allocation": plan["allocation"],
            "rounding": {**rounding.settings(), "tensors": {k: sum(1 for e in plan["tensors"].values()
                                                                   if e["rounding"] == k)
                                                            for k in ("gptq", "rtn", "float")}},
            "seconds": {"hessians": round(t_hess, 1), "sensitivity": round(t_sens, 1), "total": round(time.perf_counter() - t_start, 1)},
        }
        _dump(report, tmp / "mixq" / "report.json")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return report
