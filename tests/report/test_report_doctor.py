"""mixq doctor on broken copies of a converted fixture: each problem is found, fixed (with a backup, once),
and the fixed model still loads with stock mlx_lm.load."""

import hashlib
import json
import math
import shutil

import pytest
from mlx_lm import load as lm_load

from mixq.cli import main
from mixq.core.errors import MixqError
from mixq.core.modelio import fingerprint, load
from mixq.kvcache import make_cache, uniform_config
from mixq.kvcache.config import save as save_kv
from mixq.quant.convert import ConvertOptions, convert
from mixq.report import doctor as doctor_mod
from mixq.report.bench import BenchOptions, run_bench
from mixq.report.doctor import doctor, exit_code

ALWAYS_OPENS_THINK = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}" \
                     "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"


@pytest.fixture(scope="module")
def quant(nemotron_dense, tmp_path_factory):
    out = tmp_path_factory.mktemp("doctor") / "q"
    convert(ConvertOptions(model=str(nemotron_dense), out=str(out), samples=4, seq_len=32, heldout_samples=4,
                           progress=False))
    return out


def _copy(quant, tmp_path, name="m"):
    return shutil.copytree(quant, tmp_path / name)


def _edit(path, name, fn):
    doc = json.loads((path / name).read_text())
    fn(doc)
    (path / name).write_text(json.dumps(doc, indent=2))


def _digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir()) if f.is_file()}


def _checks(res, key="findings"):
    return {f.check for f in res[key]}


def _loads_and_matches(path, original):
    """mlx_lm.load reads it, and every quantized module has the bits / group size of the original."""
    model, _ = lm_load(str(path))
    got = {n: (m.bits, m.group_size) for n, m in model.named_modules() if hasattr(m, "bits")}
    ref, _ = lm_load(str(original))
    assert got == {n: (m.bits, m.group_size) for n, m in ref.named_modules() if hasattr(m, "bits")} and got


def _first_quantized_entry(cfg):
    return next(k for k, v in cfg["quantization"].items() if isinstance(v, dict))


BROKEN = {
    # name: (mutation of the copy, check that finds it, verify the fix)
    "dtype": (lambda p: _edit(p, "config.json", lambda c: c.__setitem__("dtype", c.pop("torch_dtype"))),
              "config.torch_dtype", lambda p: json.loads((p / "config.json").read_text())["torch_dtype"] == "bfloat16"),
    "mode_affine": (lambda p: None, "quantization.mode",
                    lambda p: '"mode"' not in (p / "config.json").read_text()),
    "time_step_limit": (lambda p: None, "nemotron_h.time_step_limit",
                        lambda p: json.loads((p / "config.json").read_text())["time_step_limit"] == [0.0, math.inf]),
    "tagged_float": (lambda p: _edit(p, "config.json", lambda c: c.__setitem__(
        "time_step_limit", [0.0, {"__float__": "Infinity"}])), "config.tagged_floats",
        lambda p: "__float__" not in (p / "config.json").read_text()
        and json.loads((p / "config.json").read_text())["time_step_limit"] == [0.0, math.inf]),
    "tokenizers_backend": (lambda p: _edit(p, "tokenizer_config.json",
                                           lambda t: t.__setitem__("tokenizer_class", "TokenizersBackend")),
                           "tokenizer.class", lambda p: json.loads((p / "tokenizer_config.json").read_text())
                           ["tokenizer_class"] == "PreTrainedTokenizerFast"),
    "no_chat_template": (lambda p: _edit(p, "tokenizer_config.json", lambda t: t.pop("chat_template")),
                         "tokenizer.chat_template",
                         lambda p: "<think>" in json.loads((p / "tokenizer_config.json").read_text())["chat_template"]),
    "orphan_entry": (lambda p: _edit(p, "config.json", lambda c: [c[k].__setitem__(
        "backbone.layers.99.mixer.q_proj", {"group_size": 64, "bits": 4}) for k in ("quantization", "quantization_config")]),
        "weights.orphan_quant_entries", lambda p: "layers.99" not in (p / "config.json").read_text()),
}


@pytest.mark.parametrize("problem", sorted(BROKEN))
def test_each_problem_is_found_fixed_and_the_model_loads(problem, quant, nemotron_dense, tmp_path):
    mutate, check, fixed_ok = BROKEN[problem]
    m = _copy(quant, tmp_path)
    mutate(m)
    base = str(nemotron_dense) if problem in ("no_chat_template", "tokenizers_backend") else None
    found = doctor(m, base=base)
    assert check in _checks(found)
    before = _digest(m)
    res = doctor(m, fix=True, base=base)
    assert check in {f.check for f in res["findings"] if f.fixed}
    assert check not in _checks(res, "remaining")
    assert fixed_ok(m)
    assert res["loads_with_mlx_lm"] and res["backup"]
    backup = doctor_mod.Path(res["backup"])
    for name in res["changed_files"]:  # the originals are kept
        if name in before:
            assert hashlib.sha256((backup / name).read_bytes()).hexdigest() == before[name]
    _loads_and_matches(m, quant)
    # running again changes nothing and makes no second backup
    after = _digest(m)
    again = doctor(m, fix=True, base=base)
    assert again["changed_files"] == [] and again["backup"] is None and _digest(m) == after
    assert len(list((m / "mixq" / "doctor-backup").iterdir())) == 1


def test_quant_shape_mismatch_is_rederived_from_the_stored_shapes(quant, tmp_path):
    m = _copy(quant, tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    key = _first_quantized_entry(cfg)
    right = cfg["quantization"][key]["bits"]
    wrong = 8 if right != 8 else 4
    _edit(m, "config.json", lambda c: [c[k][key].__setitem__("bits", wrong) for k in ("quantization", "quantization_config")])
    with pytest.raises(Exception):
        lm_load(str(m))  # stock mlx-lm refuses the mismatch
    found = doctor(m)
    f = next(f for f in found["findings"] if f.check == "weights.quant_shape")
    assert key in f.message and f.severity == "error" and f.fixable
    res = doctor(m, fix=True)
    assert "weights.quant_shape" not in _checks(res, "remaining")
    assert json.loads((m / "config.json").read_text())["quantization"][key]["bits"] == right
    _loads_and_matches(m, quant)


def test_missing_template_without_base_is_reported_not_invented(quant, tmp_path):
    m = _copy(quant, tmp_path)
    _edit(m, "tokenizer_config.json", lambda t: t.pop("chat_template"))
    res = doctor(m, fix=True)
    f = next(f for f in res["findings"] if f.check == "tokenizer.chat_template")
    assert not f.fixable and not f.fixed and "--base" in f.fix
    assert "chat_template" not in json.loads((m / "tokenizer_config.json").read_text())


def test_tokenizer_class_without_base_falls_back_to_the_fast_class(quant, tmp_path):
    m = _copy(quant, tmp_path)
    _edit(m, "tokenizer_config.json", lambda t: t.__setitem__("tokenizer_class", "TokenizersBackend"))
    res = doctor(m, fix=True)
    f = next(f for f in res["findings"] if f.check == "tokenizer.class")
    assert f.fixed and "--base" in f.fix
    lm_load(str(m))


def test_template_that_always_opens_think_points_at_mixq_serve(quant, tmp_path):
    m = _copy(quant, tmp_path)
    assert "tokenizer.think" not in _checks(doctor(m))  # the fixture's template honours /no_think
    _edit(m, "tokenizer_config.json", lambda t: t.__setitem__("chat_template", ALWAYS_OPENS_THINK))
    f = next(f for f in doctor(m)["findings"] if f.check == "tokenizer.think")
    assert "mixq serve" in f.fix and not f.fixable
    lm_load(str(m))


def test_mlp_layers_matter_to_lmstudio_not_to_mlx_lm(quant, tmp_path):
    m = _copy(quant, tmp_path)
    f = next(f for f in doctor(m, runtimes=["lmstudio"])["findings"] if f.check == "nemotron_h.mlp_layers")
    assert f.severity == "error" and "KeyError: '-'" in f.message and not f.fixable
    assert "nemotron_h.mlp_layers" not in _checks(doctor(m, runtimes=["mlx-lm"]))


def test_fix_for_mlx_lm_leaves_a_clean_model(quant, tmp_path):
    m = _copy(quant, tmp_path)
    assert exit_code(doctor(m, runtimes=["mlx-lm"])) == 1
    res = doctor(m, fix=True, runtimes=["mlx-lm"])
    assert res["remaining"] == [] and exit_code(res) == 0
    # every runtime: only the architecture finding is left
    assert _checks(doctor(m), "remaining") == {"nemotron_h.mlp_layers"}


def test_kv_config_and_bench_stay_bound_after_a_fix(quant, tmp_path):
    m = _copy(quant, tmp_path)
    save_kv(uniform_config(load(m), 8), m / "kv_config.json")
    run_bench(BenchOptions(model=str(m), prompt_tokens=[8], gen_tokens=2, runs=1, warmup=0))
    res = doctor(m, fix=True)
    assert {"config.json", "kv_config.json", "mixq/bench.json"} <= set(res["changed_files"])
    make_cache(load(m), m / "kv_config.json")  # fingerprint re-bound: not refused
    bench = json.loads((m / "mixq" / "bench.json").read_text())
    assert bench["benchmarks"][0]["model"]["fingerprint"] == fingerprint(m)
    backup = doctor_mod.Path(res["backup"])
    assert (backup / "kv_config.json").is_file() and (backup / "mixq" / "bench.json").is_file()


def test_a_fix_that_breaks_loading_is_rolled_back(quant, tmp_path, monkeypatch):
    m = _copy(quant, tmp_path)
    before = _digest(m)
    monkeypatch.setattr(doctor_mod, "_loads", lambda d: "simulated failure")
    with pytest.raises(MixqError, match="restored"):
        doctor(m, fix=True)
    assert _digest(m) == before


def test_qwen3_quant_is_clean_after_fix(qwen3, tmp_path):
    q = tmp_path / "q"
    convert(ConvertOptions(model=str(qwen3), out=str(q), samples=4, seq_len=32, heldout_samples=4, progress=False))
    res = doctor(q, fix=True)
    assert "quantization.mode" in _checks(res)
    assert _checks(res) <= {"quantization.mode", "quantization.microscaled"}  # the plan may pick mxfp4/nvfp4
    assert exit_code(res) == 0 and all(f.severity == "info" for f in res["remaining"])
    model, _ = lm_load(str(q))  # microscaled entries keep their mode; affine ones lose only the default key
    cfg = json.loads((q / "config.json").read_text())
    for path, e in cfg["quantization"].items():
        if isinstance(e, dict):
            assert getattr(dict(model.named_modules())[path], "mode", "affine") == e.get("mode", "affine")


def test_cli(quant, tmp_path, capsys):
    m = _copy(quant, tmp_path)
    assert main(["doctor", str(m), "--for", "mlx-lm"]) == 1
    out = capsys.readouterr().out
    assert "WARNING quantization.mode" in out and "fixable with --fix" in out
    assert main(["doctor", str(m), "--for", "mlx-lm", "--fix"]) == 0
    assert "0 problem(s) remain" in capsys.readouterr().out
    assert main(["doctor", str(m), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [f["check"] for f in doc["findings"]] == ["nemotron_h.mlp_layers"] and doc["exit_code"] == 1
    assert main(["doctor", str(tmp_path / "nope")]) == 2
    assert main(["doctor", str(m), "--base", "acme/not-cached"]) == 2  # offline: one line, no traceback
    assert "cannot read its tokenizer files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["doctor", str(m), "--for", "vllm"])
    assert e.value.code == 2
