"""`convert`'s evaluate-and-write stage: the plan rounded (GPTQ, on the quantized model's own inputs or the
float model's) and written to shards as one sweep runs it, beside the uniform rival of its size; a rival that
measures lower calibration KL replaces the plan."""

from __future__ import annotations

import shutil

from mixq.core.formats import tensor_bytes
from mixq.quant.asymmetric import RIDGE, OwnInputs
from mixq.quant.evaluate import evaluate
from mixq.quant.plan import plan_bytes, plan_formats, uniform_formats
from mixq.quant.sensitivity import _round
from mixq.quant.sweep import Stream
from mixq.quant.tune import BlockTuner, TuneSettings
from mixq.quant.write import PlanWriter, quantization_config

REFINE_UNIFORM = 1  # the largest uniform format that fits the budget is measured against the plan ...
RIVAL_MARGIN = 10.0  # ... unless the estimates predict it >= this many times the plan's KL (measured: 7x apart)
UNTUNED = "mixq (untuned)"


def _uniform_rivals(anatomy, lm, candidates, plan) -> list:
    """The largest uniform formats whose size fits the plan's budget (smaller ones cannot beat it)."""
    params = anatomy.mlx_lm_params
    fits = []
    for spec in (c for c in candidates if c.is_quantized):
        fmts, _ = uniform_formats(anatomy, spec)
        nbytes = plan_bytes(anatomy, lm.source_dtypes, fmts)
        if nbytes * 8 / params <= plan["target_bpw"]:
            fits.append((nbytes, str(spec), fmts))
    return sorted(fits, key=lambda x: -x[0])[:REFINE_UNIFORM]


def _write_sweep(opts, lm, anatomy, runner, windows, formats, rounding, hessians, rivals, tmp, prog, timings,
                 references, grams=None):
    """One sweep on the calibration windows: the plan (written as it is rounded) and its rivals; `grams`: more
    windows the float blocks run on for GPTQ's Grams. Returns the streams' results and the plan's rounding
    (its own, where GPTQ rounds against the quantized model's inputs)."""
    writer = PlanWriter(tmp, anatomy, formats, lm.source_dtypes, max_shard_bytes=opts.max_shard_bytes)
    tuner = BlockTuner(runner, TuneSettings(seed=opts.seed)) if opts.refine else None
    own = opts.gptq_inputs == "quantized" and hessians is not None

    def stream(name, fmts, **kw):   # with own inputs the stream runs (every window) and has a rounding of its own
        if not own:
            return Stream(name, fmts, rounding, **kw)
        # the target's ridge: RIDGE x inputs / rows x mean(diag H~) (mixq.quant.asymmetric.target)
        return Stream(name, fmts, rounding.fork(OwnInputs(hessians), inputs="quantized model's",
                                                target_ridge=RIDGE),
                      own_inputs=True, **{**kw, "measure": True})

    # the plan runs (a forward and a head comparison) only where its calibration KL decides something: against
    # a rival, or its tuning's effect, or where its own inputs are needed; otherwise it is rounded and written,
    # and held-out text measures it. A rival is rounded against the float inputs, as it would be written if it
    # won (its own inputs would cost it as much again as the plan's)
    plan_stream = stream("mixq", formats, tuner=tuner, measure=bool(rivals) or tuner is not None)
    streams = [plan_stream] + [Stream(name, fmts, rounding) for _, name, fmts in rivals]
    if tuner is not None:   # the same rounding untuned: the tuning's effect on the calibration KL
        streams.append(stream(UNTUNED, formats))

    def on_rounded(stream, path, q):
        if stream is plan_stream:
            writer.put_quantized(path, q)

    try:
        prog.start("evaluate and write" if rivals else "write")
        got, res = evaluate(runner, anatomy, windows.tokens, streams, batch_size=opts.batch_size,
                            gptq_paths=set(hessians.paths) if hessians else (), hessians=hessians,
                            on_rounded=on_rounded, progress=prog, references=references,
                            gram_tokens=None if grams is None else grams.tokens)
        timings["evaluate and write"] = [round(x, 3) for x in res.block_seconds]
        if tuner is not None:
            got["mixq"]["tuning"] = {**tuner.to_dict(), "kl_calibration_before": got.pop(UNTUNED)["kl_mean"],
                                     "kl_calibration_after": got["mixq"]["kl_mean"]}
        fresh = lm.weights.fresh()
        for name in writer.missing_plain():
            writer.put_plain(name, fresh[name])
        del fresh
        writer.close(quantization_config(lm.config, writer.formats, anatomy), lm.path)
    except BaseException:
        writer.abort()
        raise
    prog.end()
    return got, plan_stream.rounding


def _predicted_kl(plan, fmts) -> float:
    """The plan's tensors at `fmts` (path -> format): the sum of their sensitivity costs (nan if one is missing)."""
    return sum(float(e["sensitivity"].get(str(fmts[p]), "nan")) for p, e in plan["tensors"].items())


def _screen_rivals(plan, rivals) -> tuple[list, dict]:
    """The rivals worth a stream: those the estimates do not already put RIVAL_MARGIN times above the plan
    (a stream is a forward of the whole model plus the rival's GPTQ solves). Returns them and the rest's
    predicted KLs."""
    kept, skipped = [], {}
    for nbytes, name, fmts in rivals:
        pred = _predicted_kl(plan, fmts)
        if pred == pred and plan["predicted_kl"] > 0 and pred >= RIVAL_MARGIN * plan["predicted_kl"]:
            skipped[name] = _round(pred)
        else:
            kept.append((nbytes, name, fmts))
    return kept, skipped


def evaluate_and_write(opts, lm, anatomy, runner, windows, plan, rounding, hessians, candidates, tmp, prog,
                       timings, references, grams=None):
    """Round and write the plan in one sweep beside the largest uniform format that fits its budget (unless the
    estimates rule that out); where that rival measures lower calibration KL, `plan` takes its formats (in
    place) and is written again. Returns the plan's calibration KL (None: not measured), the refinement
    record and the written stream's rounding."""
    rivals, skipped = _screen_rivals(plan, _uniform_rivals(anatomy, lm, candidates, plan))
    got, written = _write_sweep(opts, lm, anatomy, runner, windows, plan_formats(plan), rounding, hessians, rivals,
                                tmp, prog, timings, references, grams)
    mixq_calib = got.get("mixq")   # None: not measured (no rival, no tuning)
    refinement = {"applied": False, "compared": {name: got[name]["kl_mean"] for _, name, _ in rivals}}
    if skipped:
        refinement["not_measured"] = {
            "predicted_kl": skipped, "plan_predicted_kl": _round(plan["predicted_kl"]),
            "reason": f"predicted >= {RIVAL_MARGIN:g}x the plan's KL"}
    best = min(((got[name]["kl_mean"], name, fmts) for _, name, fmts in rivals), default=None, key=lambda x: x[0])
    if best is not None and best[0] < mixq_calib["kl_mean"]:
        # interactions made the knapsack's pick worse than a simpler plan that fits: take the simpler one
        kl, name, fmts = best
        refinement.update({"applied": True, "replaced_plan_kl": mixq_calib["kl_mean"],
                           "reason": f"uniform {name} measured lower calibration KL ({kl:.4g} < "
                                     f"{mixq_calib['kl_mean']:.4g})"})
        for path, e in plan["tensors"].items():
            e["format"] = str(fmts[path])
            e["bytes"] = tensor_bytes(e["shape"], fmts[path], lm.source_dtypes.get(path, "float32"))
        plan["total_bytes"] = plan_bytes(anatomy, lm.source_dtypes, fmts)
        plan["achieved_bpw"] = plan["total_bytes"] * 8 / anatomy.mlx_lm_params
        plan["predicted_kl"] = _predicted_kl(plan, fmts)
        shutil.rmtree(tmp, ignore_errors=True)
        # measured again only when tuned; otherwise it is the rival as measured (the same formats and rounding)
        again, written = _write_sweep(opts, lm, anatomy, runner, windows, fmts, rounding, hessians, [], tmp, prog,
                                      timings, references, grams)
        mixq_calib = again.get("mixq") or got[name]
    return mixq_calib, refinement, written
