"""`convert`: size -> measure -> allocate -> evaluate and write -> verify -> held-out check, replayable.

Every stage leaves a JSON document: sensitivity.json (reusable, keyed by every setting that affects it),
plan.json (the choice, its size and its predicted and measured KL) and report.json (the comparison with
uniform quants of neighbouring size, costs and timings). Weights stay in their stored dtype and are read
block by block; the plan's tensors are rounded and written to shards as one sweep evaluates them, into a
temporary sibling directory renamed into place only after `mlx_lm.load` has read it back and matched the
plan. The held-out numbers are measured on the written files. The calibration passes stream to
`OUT.mixq-work/`, so an interrupted run resumes there.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import mixq
from mixq.core.anatomy import describe
from mixq.core.errors import MixqError
from mixq.core.formats import DEFAULT_CANDIDATES, Format, parse_candidates
from mixq.core.modelio import fingerprint, load, load_quantized
from mixq.core.progress import Progress
from mixq.core.stwriter import MLX_SHARD_BYTES, patch
from mixq.quant import calibration
from mixq.quant.apply import verify
from mixq.quant.calibpass import Calibration, make_rounding
from mixq.quant.distill import STUDENTS, DistillSettings, Distiller, streamed_targets
from mixq.quant.evaluate import WrittenModel, evaluate
from mixq.quant.plan import make_plan, plan_bytes, recipe_formats, uniform_formats
from mixq.quant.preflight import format_preflight, preflight
from mixq.quant.sensitivity import FORMAT, METHODS, load_sensitivity
from mixq.quant.sweep import Stream
from mixq.quant.write_stage import evaluate_and_write

UNDISTILLED = "mixq (undistilled)"


@dataclass
class ConvertOptions:
    model: str = "demo"
    out: str | None = None
    target_bpw: float = 4.5
    candidates: str | None = None
    calibration: str | None = None
    samples: int = 16
    hessian_samples: int = 64   # windows GPTQ's second moments are taken over (the calibration ones, then more)
    seq_len: int = 256
    seed: int = 0
    sensitivity: str | None = None
    sensitivity_method: str = "estimate"
    heldout_samples: int = 16
    compare: str = "4:64"   # baselines measured beside the written model on held-out text ("none": only it)
    rounding: str = "gptq"
    gptq_inputs: str = "auto"   # GPTQ on the quantized model's inputs, "float", or "auto": quantized where it fits
    force: bool = False
    progress: bool = True
    dry_run: bool = False
    stream_weights: str = "auto"
    batch_size: int = 8
    max_shard_bytes: int = MLX_SHARD_BYTES
    refine: bool = False    # tune each block's scales and biases against the float block (mixq.quant.tune)
    distill: bool = False   # then tune every scale and bias end to end on the float model's KL (mixq.quant.distill)
    distill_windows: int = 128
    distill_epochs: int = 4
    distill_student: str = "auto"   # float, quantized, or auto: the float one where it fits (preflight)
    command: list[str] = field(default_factory=list)


def _versions() -> dict:
    from importlib.metadata import version

    return {"mixq": mixq.__version__, "mlx": version("mlx"), "mlx-lm": version("mlx-lm")}


def _dump(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _check_options(opts: ConvertOptions) -> Path:
    if not (0 < opts.target_bpw <= 32):
        raise MixqError(f"--target-bpw must be in (0, 32], got {opts.target_bpw}")
    if opts.samples < 1 or opts.seq_len < 8:
        raise MixqError("--samples must be >= 1 and --seq-len >= 8")
    if opts.hessian_samples < 1:
        raise MixqError("--hessian-samples must be >= 1")
    if opts.rounding not in ("gptq", "rtn"):
        raise MixqError(f"--rounding must be gptq or rtn, got {opts.rounding!r}")
    if opts.gptq_inputs not in ("auto", "quantized", "float"):
        raise MixqError(f"--gptq-inputs must be auto, quantized or float, got {opts.gptq_inputs!r}")
    if opts.sensitivity_method not in METHODS:
        raise MixqError(f"--sensitivity-method must be one of {', '.join(METHODS)}, got {opts.sensitivity_method!r}")
    if opts.stream_weights not in ("auto", "on", "off"):
        raise MixqError(f"--stream-weights must be auto, on or off, got {opts.stream_weights!r}")
    _baselines(opts.compare)
    if opts.heldout_samples < 1:
        raise MixqError("--heldout-samples must be >= 1")
    if opts.distill and (opts.distill_windows < 1 or opts.distill_epochs < 1):
        raise MixqError("--distill-windows and --distill-epochs must be >= 1")
    if opts.distill_student not in ("auto", *STUDENTS):
        raise MixqError(f"--distill-student must be auto, {' or '.join(STUDENTS)}, got {opts.distill_student!r}")
    out = Path(opts.out or f"{Path(str(opts.model)).name}-mixq-{opts.target_bpw:g}bpw").expanduser()
    if out.exists() and not opts.force and not opts.dry_run:
        raise MixqError(f"{out} already exists (use --force to replace it)")
    return out


def _baselines(spec: str) -> list[str]:
    """--compare: uniform formats (BITS:GROUP, mxfp4, ...) or mlx-lm recipes (mixed_4_6, ...), or none."""
    if spec.strip() in ("", "none"):
        return []
    out = []
    for b in (x.strip() for x in spec.split(",") if x.strip()):
        if b.startswith("mixed_"):
            from mlx_lm.convert import QUANT_RECIPES

            if b not in QUANT_RECIPES:
                raise MixqError(f"--compare: unknown mlx-lm recipe {b!r} ({', '.join(QUANT_RECIPES)})")
        else:
            Format.parse(b)
        out.append(b)
    return out


def _check_finite(lm) -> None:
    """NaN/Inf anywhere in the floating weights is a broken model: refuse it by name (read one at a time)."""
    import mlx.core as mx

    for k, v in lm.weights.fresh().items():
        if mx.issubdtype(v.dtype, mx.floating) and not mx.isfinite(v).all().item():
            raise MixqError(f"weight {k} contains NaN or Inf")


def convert(opts: ConvertOptions) -> dict:
    t_start = time.perf_counter()
    prog = Progress(opts.progress)
    out = _check_options(opts)
    candidates = parse_candidates(opts.candidates) if opts.candidates else list(DEFAULT_CANDIDATES)
    if Format("float") not in candidates:
        candidates.append(Format("float"))
    docs = calibration.load_documents(opts.calibration)

    lm = load(opts.model, compute_dtype=None, lazy=True)
    anatomy = describe(lm.model, lm.config)
    if any(t.current for t in anatomy.tensors):
        raise MixqError(f"{opts.model} is already quantized; convert from the float model")
    windows = calibration.make_windows(docs, lm.tokenizer, n_samples=opts.samples, seq_len=opts.seq_len,
                                       seed=opts.seed)
    grams = _gram_windows(opts, docs, lm)
    emb = next(t for t in anatomy.tensors if t.module_type == "Embedding")
    distill = DistillSettings(windows=opts.distill_windows, epochs=opts.distill_epochs, seed=opts.seed) \
        if opts.distill else None
    pf = preflight(anatomy, candidates, lm.source_dtypes, samples=opts.samples, seq_len=opts.seq_len,
                   gram_samples=0 if grams is None else grams.n,
                   own_inputs=opts.rounding == "gptq" and {"auto": "auto", "quantized": True}.get(opts.gptq_inputs, False),
                   batch_size=opts.batch_size, hidden=emb.shape[-1], vocab=emb.shape[0], top_k=anatomy.top_k,
                   stream_weights=opts.stream_weights, distill=distill, distill_student=opts.distill_student,
                   target_bpw=opts.target_bpw)
    if distill is not None:
        distill = replace(distill, student=pf.distill_student)
    opts = replace(opts, gptq_inputs="quantized" if pf.own_inputs else "float")   # auto decided by preflight
    if opts.dry_run:
        return {"dry_run": True, "target_bpw": opts.target_bpw, "preflight": pf.to_dict(),
                "text": format_preflight(pf, opts.target_bpw)}
    pf.check_target(opts.target_bpw)
    pf.check_memory()
    prog.log(f"{len(pf.tensors)} tensors, feasible {pf.min_bpw:.3f}..{pf.max_bpw:.3f} bpw, about "
             f"{pf.peak / 2**30:.2f} GiB needed" + (", weights streamed block by block" if pf.stream_weights else "")
             + (f", {pf.inputs_note()}" if pf.own_inputs_left else ""))
    prog.start("reading weights")
    _check_finite(lm)
    prog.end()
    runner = lm.runner(retain=not pf.stream_weights)
    work = out.with_name(out.name + ".mixq-work")
    sens, key, cal, rounding, hessians = _sensitivity(opts, lm, anatomy, runner, windows, candidates, work, prog,
                                                      keep_grams=grams is None)
    plan = make_plan(anatomy, sens, candidates, opts.target_bpw, lm.source_dtypes)

    tmp = out.with_name(f".{out.name}.mixq-tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        timings: dict = {}  # stage -> seconds per block
        if grams is not None:   # the write sweep's Grams cover more windows: nothing solved with the others is reused
            rounding.release()
        mixq_calib, refinement, rounding = evaluate_and_write(opts, lm, anatomy, runner, windows, plan, rounding,
                                                              hessians, candidates, tmp, prog, timings,
                                                              cal.references, grams)
        # nothing is rounded again: the distillation and the held-out check run without the sweeps' state
        # (preflight sizes the distillation as a stage of its own)
        rounding.release()
        if hessians is not None:
            hessians.release()
        del cal
        distillation, undistilled = _distill(opts, distill, lm, anatomy, runner, docs, tmp, work, prog) \
            if distill else (None, None)
        plan_doc = _finish_plan(opts, plan, lm, anatomy, windows, key, rounding, mixq_calib, refinement, distillation,
                                grams)
        _dump(plan_doc, tmp / "mixq" / "plan.json")
        _dump(sens, tmp / "mixq" / "sensitivity.json")
        check = verify(tmp, plan_doc)
        rows, held = _heldout(opts, lm, anatomy, runner, plan_doc, tmp, prog, timings, undistilled)
        if distillation is not None:
            before = next(r for r in rows if r["name"] == UNDISTILLED)
            distillation["heldout_kl_before"], distillation["heldout_kl_after"] = before["kl_mean"], rows[0]["kl_mean"]
        plan_doc["measured_heldout"] = {k: rows[0][k] for k in ("kl_mean", "kl_p99", "top1", "ppl", "float_ppl")}
        plan_doc["heldout"] = held.to_dict()
        _dump(plan_doc, tmp / "mixq" / "plan.json")
        on_disk = sum(f.stat().st_size for f in tmp.glob("model*.safetensors"))
        rows[0]["disk_bytes"] = on_disk
        prog.end()
        report = _report(out, on_disk, plan_doc, rows, check, sens, refinement, distillation, pf, rounding, prog,
                         t_start, timings)
        _dump(report, tmp / "mixq" / "report.json")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return report


def _sensitivity(opts, lm, anatomy, runner, windows, candidates, work, prog, keep_grams: bool = True) -> tuple:
    """The sensitivity stage (measured, or read from --sensitivity under the same key): (sensitivity doc,
    key, the Calibration with its references, the rounding and the Hessians the write reuses; `keep_grams`:
    the blocks' Grams kept for it where they fit)."""
    # solved roundings kept for the write sweep live in files: in memory they were a third of a 9B slice's
    # memory beyond its weights
    rounding, hessians = make_rounding(anatomy, opts.rounding, spill=work / "rounded", keep_grams=keep_grams)
    key = {
        "method": METHODS[opts.sensitivity_method], "rounding": rounding.settings(), "model": fingerprint(lm.path),
        "candidates": [str(c) for c in candidates], "calibration_sha256": windows.sha256, "samples": opts.samples,
        "seq_len": opts.seq_len, "seed": opts.seed, "compute_dtype": "float32",
        **({"target_bpw": opts.target_bpw} if opts.sensitivity_method == "estimate" else {}),
    }
    cal = Calibration(runner, anatomy, windows.tokens, candidates, rounding=rounding, hessians=hessians,
                      method=opts.sensitivity_method, target_bpw=opts.target_bpw, source_dtypes=lm.source_dtypes,
                      seed=opts.seed, batch_size=opts.batch_size, partial=work / "sensitivity.partial.jsonl",
                      key=key, progress=prog)
    if opts.sensitivity:
        sens = load_sensitivity(opts.sensitivity, key)
        prog.log(f"sensitivity: reusing {opts.sensitivity}")
        cal.prepare_rounding()
    else:
        prog.log(f"sensitivity ({opts.sensitivity_method}): {len(cal.items)} tensors x "
                 f"{len(cal.candidates)} formats on {opts.samples} x {opts.seq_len} calibration tokens")
        sens = {"format": FORMAT, "key": key, **cal.run()}
    return sens, key, cal, rounding, hessians


def _report(out, on_disk, plan_doc, rows, check, sens, refinement, distillation, pf, rounding, prog, t_start,
            timings) -> dict:
    """report.json (and what the CLI prints): the plan, the held-out rows, each stage's cost."""
    return {
        "out": str(out), "disk_bytes": on_disk,
        "plan": {k: plan_doc[k] for k in ("target_bpw", "achieved_bpw", "total_bytes", "predicted_kl",
                                          "measured_kl_calibration")},
        "comparison": rows, "verify": check, "sensitivity_method": sens["method"],
        "sensitivity_cost": sens["cost"], "calibration_fit": sens.get("calibration"),
        "refinement": refinement, "allocation": plan_doc["allocation"], "tuning": _tuning_summary(plan_doc),
        "distillation": None if distillation is None else {
            k: v for k, v in distillation.items() if k not in ("tensors", "epochs_run")},
        "preflight": {
            k: v for k, v in pf.to_dict().items() if k != "tensors"},
        "rounding": {**rounding.settings(), "tensors": {k: sum(1 for e in plan_doc["tensors"].values()
                                                               if e["rounding"] == k)
                                                        for k in ("gptq", "rtn", "float")}},
        "seconds": {**{k: round(v, 1) for k, v in prog.seconds.items()},
                    "total": round(time.perf_counter() - t_start, 1)},
        "block_seconds": {**sens["cost"].get("block_seconds", {}), **timings},
    }


def _tuning_summary(plan_doc: dict) -> dict | None:
    t = plan_doc.get("tuning")
    if not t:
        return None
    return {k: t[k] for k in ("method", "steps", "lr", "seconds", "block_forwards", "loss_before", "loss_after",
                              "kl_calibration_before", "kl_calibration_after")} | {
        "blocks_kept": sum(1 for b in t["blocks"] if b["kept"]), "blocks": len(t["blocks"])}


def _finish_plan(opts, plan, lm, anatomy, windows, key, rounding, mixq_calib, refinement, distillation,
                 grams=None) -> dict:
    mixq_calib = mixq_calib or {}
    tuned = {p for b in (mixq_calib.get("tuning") or {}).get("blocks", []) if b["kept"] for p in b["tensors"]}
    distilled = set(distillation["tensors"]) if distillation and distillation["kept"] else set()
    for path, e in plan["tensors"].items():
        e["rounding"] = rounding.name_for(path, Format.parse(e["format"]))
        if path in tuned:
            e["tuned"] = True   # scales and biases tuned against the float block (mixq.quant.tune)
        if path in distilled:
            e["distilled"] = True   # scales and biases tuned end to end (mixq.quant.distill)
    plan.update({
        "rounding": {**rounding.settings(), **({} if grams is None else {
            # GPTQ's second moments: the calibration windows and these (the sensitivity estimates: the former)
            "gram_windows": {**grams.to_dict(), "total_windows": opts.samples + grams.n}})},
        "model": {"name": str(opts.model), "fingerprint": key["model"], "model_type": anatomy.model_type,
                  "pattern": anatomy.pattern},
        "calibration": {**windows.to_dict(), "source": opts.calibration or "built-in"},
        "sensitivity_key": key,
        "predicted_kl_calibration": plan["predicted_kl"],
        "measured_kl_calibration": mixq_calib.get("kl_mean"),   # None: measured on held-out text only
        "refinement": refinement,
        "tuning": mixq_calib.get("tuning"),
        "distillation": distillation,
        "versions": _versions(),
        "command": opts.command,
    })
    return plan


def _gram_windows(opts, docs, lm):
    """The windows GPTQ's Grams take beyond the calibration ones (--hessian-samples in all; their own seed),
    or None: GPTQ's Hessians are then the calibration windows' (kept from the backward where they fit)."""
    extra = opts.hessian_samples - opts.samples
    if extra <= 0 or opts.rounding != "gptq":
        return None
    return calibration.make_windows(docs, lm.tokenizer, n_samples=extra, seq_len=opts.seq_len, seed=opts.seed + 2)


def _distill(opts, st, lm, anatomy, runner, docs, tmp, work, prog) -> tuple[dict, dict]:
    """End-to-end distillation of the written model's scales and biases (patched into its shards when an
    epoch beats the written values on the validation windows; its targets and epochs kept in `work` for a
    resumed run). The float model's targets come from `runner` (streamed when the convert streams); the
    student is the float model loaded lazily or the written model (`st.student`, picked by preflight).
    Returns the record and the arrays before."""
    import mlx.core as mx

    written = WrittenModel(tmp)
    before = {p: written[p] for p in written.keys()}
    mx.eval([list(q.arrays().values()) for q in before.values()])   # read now: the shards are patched in place
    # windows of their own (another seed): the validation ones are never trained on
    win = calibration.make_windows(docs, lm.tokenizer, n_samples=st.windows + st.validation, seq_len=opts.seq_len,
                                   seed=opts.seed + 1)
    prog.start("distillation")
    student = load(opts.model, lazy=True).model if st.student == "float" else load_quantized(tmp)
    tuned, record = Distiller(student, before, st, progress=prog, teacher=functools.partial(
        streamed_targets, runner, anatomy)).run(win.tokens[st.validation:], win.tokens[:st.validation],
                                                state_dir=work / "distill")
    del student
    prog.end()
    if record["kept"]:
        patch(tmp, {f"{p.rsplit('.', 1)[0]}.{n}": getattr(tuned[p], n) for p in record["tensors"]
                    for n in ("scales", "biases")})
    return record, before


def _heldout(opts, lm, anatomy, runner, plan, tmp, prog, timings, undistilled=None):
    """Held-out text: the written model (read from its files) against mlx-lm's uniform and mixed quants
    (and, when distilled, the written model before its distillation)."""
    held = calibration.heldout_windows(lm.tokenizer, n_samples=opts.heldout_samples, seq_len=opts.seq_len)
    params = anatomy.mlx_lm_params
    written = WrittenModel(tmp)
    streams = [Stream("mixq", {}, quantized=written)]
    rows = [{"name": "mixq", "bpw": plan["achieved_bpw"], "bytes": plan["total_bytes"]}]
    if undistilled is not None:
        streams.append(Stream(UNDISTILLED, {}, quantized=undistilled))
        rows.append({**rows[0], "name": UNDISTILLED})
    for b in _baselines(opts.compare):
        if b.startswith("mixed_"):
            fmts, fell = recipe_formats(anatomy, lm.model, b), []
        else:
            fmts, fell = uniform_formats(anatomy, Format.parse(b))
        nbytes = plan_bytes(anatomy, lm.source_dtypes, fmts)
        name = b if b.startswith("mixed_") else f"uniform {b}"
        streams.append(Stream(name, fmts))
        rows.append({"name": name, "bpw": nbytes * 8 / params, "bytes": nbytes, "float_fallbacks": len(fell)})
    prog.start("held-out check")
    got, res = evaluate(runner, anatomy, held.tokens, streams, batch_size=opts.batch_size, progress=prog)
    timings["held-out check"] = [round(x, 3) for x in res.block_seconds]
    prog.end()
    for r in rows:
        r.update(got[r["name"]], float_ppl=got["float"]["ppl"])
    return rows, held
