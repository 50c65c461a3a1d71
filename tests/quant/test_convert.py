"""convert end to end on a fixture: exact size accounting, verification, resume, refusals, determinism."""

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.utils import compute_bits_per_weight

from mixq.core.anatomy import describe
from mixq.core.errors import MixqError
from mixq.core.formats import Format, quantize_dequantize
from mixq.core.modelio import load
from mixq.quant.apply import verify
from mixq.quant.convert import ConvertOptions, convert
from mixq.quant.gptq import GPTQ_VERSION
from mixq.quant.plan import plan_bytes, recipe_formats, uniform_formats

SMALL = dict(samples=4, seq_len=32, heldout_samples=4, progress=False)


@pytest.fixture(scope="module")
def converted(nemotron_moe, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "q"
    report = convert(ConvertOptions(model=str(nemotron_moe), out=str(out), target_bpw=4.5, **SMALL))
    return out, report


def test_written_model_matches_plan_and_budget(converted):
    out, report = converted
    plan = json.loads((out / "mixq" / "plan.json").read_text())
    # by default GPTQ fits the written layers to the quantized model's own inputs; preflight sizes that
    assert plan["rounding"]["inputs"].startswith("quantized") and report["preflight"]["memory"]["own inputs"] > 0
    assert plan["rounding"]["target_ridge"] > 0
    assert plan["measured_kl_calibration"] > 0   # the stream runs for its inputs: measured on the way
    assert plan["achieved_bpw"] <= 4.5
    assert report["verify"]["ok"] and report["verify"]["bpw"] == pytest.approx(plan["achieved_bpw"], rel=1e-12)
    # MoE experts and shared experts are allocated like every other tensor
    assert "backbone.layers.4.mixer.switch_mlp.fc1.weight" in plan["tensors"]
    assert "backbone.layers.4.mixer.shared_experts.down_proj.weight" in plan["tensors"]
    assert "backbone.layers.4.mixer.gate.weight" not in plan["tensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == cfg["quantization_config"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    assert plan["versions"]["mlx-lm"] and plan["calibration"]["sha256"]


@pytest.mark.parametrize("spec", ["4:64", "3:32", "mxfp4", "nvfp4", "mxfp8", "8:128", "mixed_4_6"])
def test_bpw_accounting_equals_mlx_lm(nemotron_moe, spec):
    lm = load(nemotron_moe, compute_dtype=None)
    a = describe(lm.model, lm.config)
    fmts = recipe_formats(a, lm.model, spec) if spec.startswith("mixed") else uniform_formats(a, Format.parse(spec))[0]
    predicted = plan_bytes(a, lm.source_dtypes, fmts) * 8 / a.mlx_lm_params
    modules = {t.module: fmts[t.path] for t in a.tensors if t.path in fmts}
    nn.quantize(lm.model, class_predicate=lambda p, m: modules[p].quant_kwargs()
                if p in modules and modules[p].is_quantized else False)
    assert predicted == pytest.approx(compute_bits_per_weight(lm.model), rel=1e-12)


def test_verify_catches_tampered_config(converted, tmp_path):
    out, _ = converted
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    plan = json.loads((bad / "mixq" / "plan.json").read_text())
    cfg = json.loads((bad / "config.json").read_text())
    module = next(k for k, v in cfg["quantization"].items() if isinstance(v, dict) and v.get("mode") == "affine")
    # a config that claims another group size for one module: loads with wrong shapes or wrong format
    cfg["quantization"][module] = {**cfg["quantization"][module], "group_size": 32 if cfg["quantization"][module]["group_size"] != 32 else 64}
    cfg["quantization_config"] = cfg["quantization"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MixqError, match="verification failed"):
        verify(bad, plan)
    # a plan that disagrees with an untouched model is caught too
    plan2 = json.loads((out / "mixq" / "plan.json").read_text())
    path = next(iter(plan2["tensors"]))
    plan2["tensors"][path]["format"] = "8:64" if plan2["tensors"][path]["format"] != "8:64" else "2:64"
    with pytest.raises(MixqError, match="planned"):
        verify(out, plan2)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mixq", "convert", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_refusals_leave_nothing(nemotron_moe, converted, tmp_path):
    out, _ = converted
    small = ["--samples", "4", "--seq-len", "32", "--quiet"]
    r = _cli(str(nemotron_moe), "-o", str(out), *small)
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    r = _cli(str(nemotron_moe), "-o", str(tmp_path / "x"), "--target-bpw", "1.0", *small)
    assert r.returncode == 2 and "infeasible" in r.stderr and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir()) or [p.name for p in tmp_path.iterdir()] == ["x.mixq-work"]
    r = _cli(str(nemotron_moe), "-o", str(tmp_path / "y"), "--sensitivity", str(out / "mixq" / "sensitivity.json"),
             "--samples", "5", "--seq-len", "32", "--quiet")
    assert r.returncode == 2 and "different settings" in r.stderr and not (tmp_path / "y").exists()
    r = _cli(str(nemotron_moe), "-o", str(tmp_path / "z"), "--candidates", "7:64", *small)
    assert r.returncode == 2 and "bits" in r.stderr
    r = _cli(str(nemotron_moe), "-o", str(tmp_path / "d"), "--distill", "--distill-epochs", "0", *small)
    assert r.returncode == 2 and "--distill-epochs" in r.stderr and not (tmp_path / "d").exists()
    r = _cli(str(nemotron_moe), "-o", str(tmp_path / "h"), "--hessian-samples", "0", *small)
    assert r.returncode == 2 and "--hessian-samples" in r.stderr and not (tmp_path / "h").exists()
    r = _cli(str(nemotron_moe), "-o", str(tmp_path / "g"), "--gptq-inputs", "both", *small)
    assert r.returncode == 2 and "--gptq-inputs" in r.stderr and not (tmp_path / "g").exists()


def test_cli_distill_prints_its_line_and_the_undistilled_row(nemotron_moe, tmp_path):
    r = _cli(str(nemotron_moe), "-o", str(tmp_path / "d"), "--samples", "4", "--seq-len", "32", "--heldout-samples",
             "2", "--distill", "--distill-windows", "2", "--distill-epochs", "1", "--compare", "none", "--quiet")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("distillation ("))
    assert "validation KL" in line and "held-out KL" in line and "window forwards" in line
    assert any(x.startswith("mixq (undistilled)") for x in r.stdout.splitlines())


def test_nan_weights_refused(nemotron_dense, tmp_path):
    bad = tmp_path / "nan"
    shutil.copytree(nemotron_dense, bad)
    w = mx.load(str(bad / "model.safetensors"))
    k = "backbone.layers.1.mixer.q_proj.weight"
    w[k] = mx.where(mx.arange(w[k].size).reshape(w[k].shape) == 5, mx.array(float("nan"), w[k].dtype), w[k])
    mx.save_safetensors(str(bad / "model.safetensors"), w, metadata={"format": "mlx"})
    r = _cli(str(bad), "-o", str(tmp_path / "o"), "--samples", "2", "--seq-len", "16", "--quiet")
    assert r.returncode == 2 and "NaN" in r.stderr and not (tmp_path / "o").exists()


def test_sensitivity_reuse_and_determinism(nemotron_moe, converted, tmp_path):
    out, _ = converted
    sens = out / "mixq" / "sensitivity.json"
    again = tmp_path / "again"
    opts = dict(model=str(nemotron_moe), out=str(again), target_bpw=4.5, **SMALL)
    convert(ConvertOptions(sensitivity=str(sens), **opts))
    first_plan = (again / "mixq" / "plan.json").read_bytes()
    first_weights = (again / "model.safetensors").read_bytes()
    convert(ConvertOptions(force=True, **opts))  # measured afresh this time
    assert (again / "mixq" / "plan.json").read_bytes() == first_plan
    assert (again / "model.safetensors").read_bytes() == first_weights


def test_written_weights_are_what_was_measured(converted, nemotron_moe):
    """The written file, run by mlx-lm's own quantized layers, gives the held-out KL the report states; and
    the rounding label of every tensor is the truth about the written arrays."""
    from mlx_lm import load as lm_load

    from mixq.quant import calibration

    out, report = converted
    plan = json.loads((out / "mixq" / "plan.json").read_text())
    assert plan["rounding"]["method"] == GPTQ_VERSION
    kinds = {e["rounding"] for e in plan["tensors"].values()}
    assert "gptq" in kinds and kinds <= {"gptq", "rtn", "float"}
    f32 = load(nemotron_moe)
    qmodel, tok = lm_load(str(out))
    qmods, mods = dict(qmodel.named_modules()), dict(f32.model.named_modules())
    for path, e in plan["tensors"].items():
        fmt = Format.parse(e["format"])
        if fmt.is_quantized:
            q = qmods[e["module"]]
            written = mx.dequantize(q.weight, q.scales, getattr(q, "biases", None), group_size=q.group_size,
                                    bits=q.bits, mode=q.mode, dtype=mx.float32)
            src = mods[e["module"]].weight.astype(getattr(mx, f32.source_dtypes[path]))
            same = mx.array_equal(written, quantize_dequantize(src, fmt)).item()
            assert same == (e["rounding"] == "rtn"), (path, e["rounding"])
    held = calibration.heldout_windows(tok, n_samples=SMALL["heldout_samples"], seq_len=SMALL["seq_len"])
    cast = {k: v.astype(mx.float32) for k, v in __import__("mlx.utils", fromlist=["x"]).tree_flatten(
        qmodel.parameters()) if mx.issubdtype(v.dtype, mx.floating)}
    qmodel.update(__import__("mlx.utils", fromlist=["x"]).tree_unflatten(list(cast.items())))
    zp, zq = f32.model(held.tokens), qmodel(held.tokens).astype(mx.float32)
    lp, lq = zp - mx.logsumexp(zp, -1, keepdims=True), zq - mx.logsumexp(zq, -1, keepdims=True)
    kl = (mx.exp(lp) * (lp - lq)).sum(-1).mean().item()
    assert kl == pytest.approx(plan["measured_heldout"]["kl_mean"], rel=2e-2)
    assert report["comparison"][0]["kl_mean"] == plan["measured_heldout"]["kl_mean"] > 0


def test_rounding_choice_is_part_of_the_sensitivity_key(converted, nemotron_moe, tmp_path):
    out, report = converted
    assert sum(report["rounding"]["tensors"].values()) == len(json.loads((out / "mixq" / "plan.json").read_text())["tensors"])
    with pytest.raises(MixqError, match="rounding"):
        convert(ConvertOptions(model=str(nemotron_moe), out=str(tmp_path / "r"), target_bpw=4.5, rounding="rtn",
                               sensitivity=str(out / "mixq" / "sensitivity.json"), **SMALL))
    assert not (tmp_path / "r").exists()
    r = _cli(str(nemotron_moe), "-o", str(tmp_path / "r2"), "--rounding", "rtn", "--samples", "2", "--seq-len", "16",
             "--quiet")
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "r2" / "mixq" / "plan.json").read_text())
    assert plan["rounding"] == {"method": "rtn"} and {e["rounding"] for e in plan["tensors"].values()} <= {"rtn", "float"}
    assert "rounding: rtn" in r.stdout


def test_dry_run_sizes_everything_and_writes_nothing(nemotron_moe, tmp_path):
    r = _cli(str(nemotron_moe), "-o", str(tmp_path / "d"), "--dry-run", "--target-bpw", "4.5")
    assert r.returncode == 0, r.stderr
    assert "feasible bits per weight" in r.stdout and "memory needed" in r.stdout and "(target 4.5: feasible)" in r.stdout
    assert "backbone.layers.4.mixer.switch_mlp.fc1.weight" in r.stdout and "4:64" in r.stdout
    assert not any(tmp_path.iterdir())
    r = _cli(str(nemotron_moe), "--dry-run", "--json")
    doc = json.loads(r.stdout)
    lo, hi = doc["feasible_bpw"]
    assert 0 < lo < 4.5 < hi and doc["peak_bytes"] == sum(doc["memory"].values())
    t = next(t for t in doc["tensors"] if t["path"].endswith("switch_mlp.fc1.weight"))
    assert t["candidates"]["float"] > t["candidates"]["4:64"] > t["candidates"]["2:64"]


def test_auto_streams_a_large_model_or_a_short_machine(nemotron_moe, monkeypatch):
    # resident only when the stored model is small and leaves ample room; streamed otherwise
    from mixq.quant import preflight as pre

    def plan(stream_weights="auto"):
        return convert(ConvertOptions(model=str(nemotron_moe), out="unused", dry_run=True,
                                      stream_weights=stream_weights, **SMALL))["preflight"]

    small = plan()
    assert small["stream_weights"] is False and "weights (stored dtype)" in small["memory"]
    monkeypatch.setattr(pre, "STREAM_ABOVE", small["stored_bytes"] - 1)
    big = plan()
    assert big["stream_weights"] is True and "weights (stored dtype)" not in big["memory"]
    assert plan("off")["stream_weights"] is False
    monkeypatch.setattr(pre, "STREAM_ABOVE", 1 << 40)
    monkeypatch.setenv("MIXQ_AVAILABLE_MEMORY", str(int(small["peak_bytes"] * 1.2)))
    assert plan()["stream_weights"] is True  # would not leave ample room


def test_side_by_side_work_is_sized_where_the_cores_run_it(nemotron_moe, monkeypatch):
    from mixq.core import lanes

    got = {}
    for n in (1, 2):
        monkeypatch.setattr(lanes, "LANES", n)
        got[n] = convert(ConvertOptions(model=str(nemotron_moe), out="unused", dry_run=True, **SMALL))["preflight"]
    assert "side by side (lanes)" not in got[1]["memory"]
    assert got[2]["memory"]["side by side (lanes)"] == lanes.LANE_BYTES
    assert got[2]["peak_bytes"] == got[1]["peak_bytes"] + lanes.LANE_BYTES


def test_preflight_sizes_the_distillation(nemotron_moe):
    """--distill: the model in float32 and the codes (5 bytes a parameter; one copy: the float model becomes
    the student), the targets and a batch's activations and logits in the run's memory; nothing without it.
    The stage runs after the sweeps: the run's peak is the larger of the two, and the text says both."""
    plain = convert(ConvertOptions(model=str(nemotron_moe), out="unused", dry_run=True, **SMALL))["preflight"]
    got = convert(ConvertOptions(model=str(nemotron_moe), out="unused", dry_run=True, distill=True, **SMALL))["preflight"]
    assert "distillation" not in plain["memory"]
    assert 5 * got["params"] < got["memory"]["distillation"] < 9 * got["params"] + (1 << 30)
    more = convert(ConvertOptions(model=str(nemotron_moe), out="unused", dry_run=True, distill=True,
                                  distill_windows=1024, **SMALL))["preflight"]   # the targets of the windows asked for
    assert more["memory"]["distillation"] > got["memory"]["distillation"]
    # a stage of its own, after the sweeps' state is let go: the run needs the larger of the two
    stage = sum(got["memory"].get(k, 0) for k in ("process", "weights (stored dtype)", "distillation"))
    assert got["peak_bytes"] == max(plain["peak_bytes"], stage)
    assert got["distill_student"] == "float" and plain["distill_student"] is None
    text = convert(ConvertOptions(model=str(nemotron_moe), out="unused", dry_run=True, distill=True,
                                  distill_student="quantized", **SMALL))["text"]
    assert "--distill runs the quantized student" in text
    assert "then the distillation stage" in text


def test_preflight_picks_the_quantized_student_where_the_float_one_does_not_fit(nemotron_moe):
    """--distill-student auto: the float student (5 bytes a parameter more) where the run fits in the memory
    available, else the quantized one; asked for, either is sized as asked."""
    from mixq.core.formats import DEFAULT_CANDIDATES
    from mixq.quant.distill import DistillSettings
    from mixq.quant.preflight import preflight

    lm = load(nemotron_moe, compute_dtype=None, lazy=True)
    a = describe(lm.model, lm.config)
    emb = next(t for t in a.tensors if t.module_type == "Embedding")
    kw = dict(samples=4, seq_len=32, batch_size=4, hidden=emb.shape[-1], vocab=emb.shape[0], top_k=a.top_k,
              stream_weights="off", distill=DistillSettings(), target_bpw=4.5)
    cands = list(DEFAULT_CANDIDATES)
    roomy = preflight(a, cands, lm.source_dtypes, available=None, **kw)
    quant = preflight(a, cands, lm.source_dtypes, available=None, distill_student="quantized", **kw)
    tight = preflight(a, cands, lm.source_dtypes, available=roomy.distill_stage - 1, **kw)
    assert roomy.distill_student == "float" and quant.distill_student == tight.distill_student == "quantized"
    assert roomy.memory["distillation"] - quant.memory["distillation"] > 5 * roomy.params
    assert tight.memory == quant.memory and tight.distill_stage <= tight.available
    assert preflight(a, cands, lm.source_dtypes, available=1, distill_student="float", **kw).distill_student == "float"


def test_preflight_fits_gptq_to_the_own_inputs_where_they_fit(nemotron_moe, monkeypatch):
    """--gptq-inputs auto (the default): the quantized model's own inputs where the sweeps fit in the memory
    available with them, else the float inputs (their memory entry gone); asked for, the own inputs are sized
    and a run that does not fit is refused with the way out named. The convert then rounds as preflight said."""
    def dry(**kw):
        return convert(ConvertOptions(model=str(nemotron_moe), out="unused", dry_run=True, stream_weights="on",
                                      **kw, **SMALL))

    roomy, flt = dry()["preflight"], dry(gptq_inputs="float")["preflight"]
    own = roomy["memory"]["own inputs"]
    assert roomy["own_inputs"] is True and flt["own_inputs"] is False and "own inputs" not in flt["memory"]
    assert roomy["peak_bytes"] == flt["peak_bytes"] + own
    assert "GPTQ on the quantized model's own inputs" in dry()["text"]
    monkeypatch.setenv("MIXQ_AVAILABLE_MEMORY", str(flt["peak_bytes"] + own // 2))
    tight = dry()["preflight"]
    assert tight["own_inputs"] is False and tight["memory"] == flt["memory"]
    assert "GPTQ on the float model's inputs (its own would need" in dry()["text"]
    with pytest.raises(MixqError, match=r"--gptq-inputs float \(own inputs"):
        convert(ConvertOptions(model=str(nemotron_moe), out="unused", gptq_inputs="quantized", stream_weights="on",
                               **SMALL))


def test_auto_rounds_on_the_float_inputs_where_the_own_ones_do_not_fit(nemotron_moe, tmp_path, monkeypatch):
    flt = convert(ConvertOptions(model=str(nemotron_moe), out="unused", dry_run=True, stream_weights="on",
                                 gptq_inputs="float", **SMALL))["preflight"]
    own = convert(ConvertOptions(model=str(nemotron_moe), out="unused", dry_run=True, stream_weights="on",
                                 **SMALL))["preflight"]["memory"]["own inputs"]
    monkeypatch.setenv("MIXQ_AVAILABLE_MEMORY", str(flt["peak_bytes"] + own // 2))
    out = tmp_path / "auto"
    report = convert(ConvertOptions(model=str(nemotron_moe), out=str(out), stream_weights="on", **SMALL))
    plan = json.loads((out / "mixq" / "plan.json").read_text())
    assert report["preflight"]["own_inputs"] is False and "inputs" not in plan["rounding"]
    assert report["verify"]["ok"]


def test_infeasible_target_refused_before_any_pass(nemotron_moe, tmp_path):
    with pytest.raises(MixqError, match=r"infeasible.*feasible range is \d\.\d+ to \d+\.\d+ bpw"):
        convert(ConvertOptions(model=str(nemotron_moe), out=str(tmp_path / "x"), target_bpw=2.0,
                               candidates="4:64,8:64", **SMALL))
    assert not any(tmp_path.iterdir())  # not even a work dir: nothing was measured


def test_not_enough_memory_is_said_before_starting(nemotron_moe, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXQ_AVAILABLE_MEMORY", str(100 << 20))
    with pytest.raises(MixqError, match=r"needs about \d+\.\d\d GiB of memory and the machine has 0\.10 GiB"):
        convert(ConvertOptions(model=str(nemotron_moe), out=str(tmp_path / "x"), **SMALL))
    assert not any(tmp_path.iterdir())


def test_shards_streaming_and_resident_weights_write_the_same_model(nemotron_moe, converted, tmp_path):
    """Shards at a small shard size (with mlx-lm's index) and weights streamed from disk block by block
    give byte-identical tensors to the default run; stock mlx_lm.load reads the sharded model."""
    from mlx_lm import load as lm_load

    out, _ = converted
    opts = dict(model=str(nemotron_moe), target_bpw=4.5, **SMALL)
    convert(ConvertOptions(out=str(tmp_path / "s"), stream_weights="on", max_shard_bytes=40_000, **opts))
    shards = sorted((tmp_path / "s").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "s" / "model.safetensors.index.json").is_file()
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    a = {}
    for p in shards:
        a.update(mx.load(str(p)))
    b = mx.load(str(out / "model.safetensors"))
    assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]).item() for k in a)
    model, _ = lm_load(str(tmp_path / "s"))
    assert model(mx.array([[1, 2, 3]])).shape[-1] == json.loads((out / "config.json").read_text())["vocab_size"]
    plan = json.loads((tmp_path / "s" / "mixq" / "plan.json").read_text())
    assert plan["tensors"] == json.loads((out / "mixq" / "plan.json").read_text())["tensors"]


def test_exact_method_and_its_key(nemotron_dense, tmp_path):
    opts = dict(model=str(nemotron_dense), target_bpw=4.5, **SMALL)
    exact = convert(ConvertOptions(out=str(tmp_path / "e"), sensitivity_method="exact", **opts))
    est = convert(ConvertOptions(out=str(tmp_path / "s"), **opts))
    assert exact["sensitivity_method"].startswith("kl-exact") and est["sensitivity_method"].startswith("estimate")
    assert exact["sensitivity_cost"]["exact_measurements"] == exact["sensitivity_cost"]["measurements"]
    with pytest.raises(MixqError, match="different settings"):
        convert(ConvertOptions(out=str(tmp_path / "x"), sensitivity=str(tmp_path / "e" / "mixq" / "sensitivity.json"),
                               **opts))
    assert not (tmp_path / "x").exists()


def test_json_on_stdout_progress_with_eta_on_stderr(nemotron_dense, tmp_path):
    r = _cli(str(nemotron_dense), "-o", str(tmp_path / "j"), "--samples", "2", "--seq-len", "16",
             "--heldout-samples", "2", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # nothing but the report on stdout
    assert report["verify"]["ok"] and report["sensitivity_cost"]["block_forward_equivalents"]
    # "write" alone where no uniform rival is measured beside the plan
    written = "evaluate and write" if report["refinement"]["compared"] else "write"
    for stage in ("calibration forward", "calibration backward + estimates", written, "held-out check"):
        assert f"{stage}:" in r.stderr and stage in report["seconds"]
    assert "ETA" in r.stderr and "elapsed" in r.stderr


def _only_scales_and_biases_changed(out, plain_out, plan, changed: set) -> None:
    """Read back with stock mlx_lm.load: every quantized module's codes as in the plain convert, its scales
    and biases changed exactly for the tensors in `changed`."""
    from mlx_lm import load as lm_load

    a, b = lm_load(str(out))[0], lm_load(str(plain_out))[0]
    qa, qb = dict(a.named_modules()), dict(b.named_modules())
    for p, e in plan["tensors"].items():
        ma, mb = qa[e["module"]], qb[e["module"]]
        if not hasattr(ma, "scales"):
            continue
        assert mx.array_equal(ma.weight, mb.weight).item()
        same = mx.array_equal(ma.scales, mb.scales).item() and mx.array_equal(ma.biases, mb.biases).item()
        assert same == (p not in changed), p


def test_refine_tunes_scales_and_biases_only_and_records_it(nemotron_moe, tmp_path):
    """--refine: the same plan and integer codes as without it, the scales and biases of the blocks whose
    tuning lowered their loss changed (and only those), recorded in plan.json and the report; verified. (GPTQ
    on the float inputs: against the quantized model's own, a tuned block changes what the next one sees.)"""
    plain_out = tmp_path / "plain"
    convert(ConvertOptions(model=str(nemotron_moe), out=str(plain_out), target_bpw=4.5, gptq_inputs="float", **SMALL))
    out = tmp_path / "refined"
    report = convert(ConvertOptions(model=str(nemotron_moe), out=str(out), target_bpw=4.5, refine=True,
                                    gptq_inputs="float", **SMALL))
    assert report["verify"]["ok"]
    plan = json.loads((out / "mixq" / "plan.json").read_text())
    plain = json.loads((plain_out / "mixq" / "plan.json").read_text())
    assert {p: e["format"] for p, e in plan["tensors"].items()} == {p: e["format"] for p, e in plain["tensors"].items()}
    t = plan["tuning"]
    assert t["method"] and t["blocks"] and t["kl_calibration_before"] > 0 and t["kl_calibration_after"] > 0
    assert report["tuning"]["blocks"] == len(t["blocks"]) and report["tuning"]["loss_after"] <= t["loss_before"]
    assert t["kl_calibration_after"] == plan["measured_kl_calibration"]
    assert plain["tuning"] is None
    assert "inputs" not in plan["rounding"]   # --gptq-inputs float: the float model's inputs, as before
    tuned = {p for p, e in plan["tensors"].items() if e.get("tuned")}
    assert tuned
    _only_scales_and_biases_changed(out, plain_out, plan, tuned)


@pytest.mark.parametrize("student", ["float", "quantized"])
def test_distill_patches_scales_and_biases_only_and_records_it(converted, nemotron_moe, tmp_path, monkeypatch, student):
    """--distill: the plan and the integer codes of the plain convert; the written model before the
    distillation is measured beside it on held-out text (the plain convert's KL, the same bytes); scales and
    biases change exactly where plan.json says they were distilled; stock mlx_lm.load reads it. The same with
    either student (the float model with dequantized weights, or the written model's quantized kernels)."""
    import functools

    import mixq.quant.convert as conv
    from mixq.quant.distill import DistillSettings, Distiller

    # validated on its training windows (what the steps minimise), so an epoch is kept and the shards patched
    run = Distiller.run
    monkeypatch.setattr(Distiller, "run", lambda self, train, valid, **kw: run(self, train, train, **kw))
    monkeypatch.setattr(conv, "DistillSettings", functools.partial(DistillSettings, lr=1e-3))
    plain_out, plain_report = converted
    out = tmp_path / "distilled"
    report = convert(ConvertOptions(model=str(nemotron_moe), out=str(out), target_bpw=4.5, distill=True,
                                    distill_windows=4, distill_epochs=2, distill_student=student, **SMALL))
    assert report["verify"]["ok"]
    plan = json.loads((out / "mixq" / "plan.json").read_text())
    plain = json.loads((plain_out / "mixq" / "plan.json").read_text())
    assert {p: e["format"] for p, e in plan["tensors"].items()} == {p: e["format"] for p, e in plain["tensors"].items()}
    d = plan["distillation"]
    assert d["method"] and d["windows"] == 4 and d["epochs"] == 2 and plain["distillation"] is None
    assert d["student"] == student
    assert d["kept"] and d["validation_kl_after"] < d["validation_kl_before"]
    rows = {r["name"]: r for r in report["comparison"]}
    assert rows["mixq (undistilled)"]["kl_mean"] == plain_report["comparison"][0]["kl_mean"]
    assert d["heldout_kl_before"] == rows["mixq (undistilled)"]["kl_mean"] == report["distillation"]["heldout_kl_before"]
    assert d["heldout_kl_after"] == rows["mixq"]["kl_mean"]
    distilled = {p for p, e in plan["tensors"].items() if e.get("distilled")}
    assert distilled == set(d["tensors"]) and distilled
    _only_scales_and_biases_changed(out, plain_out, plan, distilled)
    with pytest.raises(MixqError, match="distill"):
        convert(ConvertOptions(model=str(nemotron_moe), out=str(tmp_path / "bad"), target_bpw=4.5, distill=True,
                               distill_epochs=0, **SMALL))


def test_a_convert_stopped_in_its_distillation_resumes_it(nemotron_moe, tmp_path, monkeypatch):
    """Stopped after the distillation's first epoch: nothing is written, its targets and epoch stay in
    OUT.mixq-work/distill, and the same command run again resumes there (the float model's targets are not
    computed again) and writes what an uninterrupted convert writes."""
    import mixq.quant.distill as distill
    from mixq.quant.distill_state import DistillState

    opts = dict(model=str(nemotron_moe), target_bpw=4.5, distill=True, distill_windows=4, distill_epochs=2, **SMALL)
    fresh = convert(ConvertOptions(out=str(tmp_path / "fresh"), **opts))["distillation"]

    class Stop(Exception):
        pass

    save = DistillState.save_epoch

    def save_then_stop(self, record, arrays):
        save(self, record, arrays)
        raise Stop

    out = tmp_path / "resumed"
    with monkeypatch.context() as m:
        m.setattr(DistillState, "save_epoch", save_then_stop)
        with pytest.raises(Stop):
            convert(ConvertOptions(out=str(out), **opts))
    assert not out.exists() and (tmp_path / "resumed.mixq-work" / "distill" / "state.json").is_file()
    calls = []
    targets = distill.targets
    monkeypatch.setattr(distill, "targets", lambda *a, **k: calls.append(1) or targets(*a, **k))
    again = convert(ConvertOptions(out=str(out), **opts))["distillation"]
    assert calls == [] and not (tmp_path / "resumed.mixq-work").exists()
    same = lambda d: {k: v for k, v in d.items() if k != "seconds"}   # noqa: E731
    assert same(again) == same(fresh)
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "fresh" / "model.safetensors").read_bytes()


def test_a_rival_the_estimates_rule_out_is_not_measured(converted, nemotron_moe, tmp_path, monkeypatch):
    """The uniform rival gets a stream unless its predicted KL is RIVAL_MARGIN times the plan's; then it is
    named with its prediction (the sum of its formats' costs), and the plan is written all the same."""
    import mixq.quant.write_stage as stage

    sens = converted[0] / "mixq" / "sensitivity.json"
    runs = {}
    for margin in (float("inf"), 0.0):
        monkeypatch.setattr(stage, "RIVAL_MARGIN", margin)
        out = tmp_path / f"m{margin}"
        runs[margin] = out, convert(ConvertOptions(model=str(nemotron_moe), out=str(out), target_bpw=4.5,
                                                   sensitivity=str(sens), **SMALL))["refinement"]
    (measured_out, measured), (screened_out, screened) = runs[float("inf")], runs[0.0]
    (name, _), = measured["compared"].items()
    assert "not_measured" not in measured
    assert screened["compared"] == {} and not screened["applied"]
    assert list(screened["not_measured"]["predicted_kl"]) == [name]
    plan = json.loads((screened_out / "mixq" / "plan.json").read_text())
    lm = load(str(nemotron_moe))
    fmts, _ = uniform_formats(describe(lm.model, lm.config), Format.parse(name))
    want = sum(e["sensitivity"][str(fmts[p])] for p, e in plan["tensors"].items())
    assert screened["not_measured"]["predicted_kl"][name] == pytest.approx(want, rel=1e-5)
    # with no rival the plan still runs (GPTQ takes its own inputs), so its calibration KL is measured; the
    # rival's stream changes nothing written
    assert plan["measured_kl_calibration"] > 0 and plan["measured_heldout"]["kl_mean"] > 0
    measured_plan = json.loads((measured_out / "mixq" / "plan.json").read_text())
    assert measured_plan["measured_kl_calibration"] > 0
    if not measured["applied"]:
        assert (screened_out / "model.safetensors").read_bytes() == (measured_out / "model.safetensors").read_bytes()


def test_gptq_takes_its_grams_over_the_gram_windows_too(converted, nemotron_moe, tmp_path):
    """--hessian-samples beyond --samples: the write sweep's Grams cover more windows (recorded in plan.json,
    sized by preflight); the plan is the same (the estimates take the calibration windows) and GPTQ's codes
    change; at --hessian-samples <= --samples the calibration windows' Grams are kept from the backward."""
    out, report = converted
    plan = json.loads((out / "mixq" / "plan.json").read_text())
    g = plan["rounding"]["gram_windows"]
    assert g["total_windows"] == 64 and g["n"] == 64 - SMALL["samples"] and g["seq_len"] == SMALL["seq_len"]
    assert report["preflight"]["memory"]["Gram windows"] == 4 * g["n"] * SMALL["seq_len"] * 64   # hidden 64
    assert report["preflight"]["memory"]["kept second moments"] == 0
    own = tmp_path / "own"
    r2 = convert(ConvertOptions(model=str(nemotron_moe), out=str(own), target_bpw=4.5, hessian_samples=4, **SMALL))
    plan2 = json.loads((own / "mixq" / "plan.json").read_text())
    assert "gram_windows" not in plan2["rounding"] and "Gram windows" not in r2["preflight"]["memory"]
    assert r2["preflight"]["memory"]["kept second moments"] > 0
    assert {p: e["format"] for p, e in plan2["tensors"].items()} == {p: e["format"] for p, e in plan["tensors"].items()}
    gptq = [e["module"] for e in plan["tensors"].values() if e["rounding"] == "gptq"]
    a, b = mx.load(str(out / "model.safetensors")), mx.load(str(own / "model.safetensors"))
    assert any(not mx.array_equal(a[f"{m}.weight"], b[f"{m}.weight"]).item() for m in gptq)
