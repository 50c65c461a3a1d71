"""mixq card on a converted fixture with eval, bench and kv results: every number in the README is the one
in the JSON that produced it, the plot is a valid PNG, and whatever is missing is said, never invented."""

import json
import shutil

import pytest
import yaml

from mixq.cli import main
from mixq.core.errors import MixqError
from mixq.core.modelio import fingerprint, load
from mixq.kvcache import uniform_config
from mixq.kvcache.config import save as save_kv
from mixq.quant.convert import ConvertOptions, convert
from mixq.report.bench import BenchOptions, run_bench
from mixq.report.card import MARKER, make_card
from mixq.report.plot import read_png_size
from mixq.report.sources import normalize_eval

from test_report_plot import parse_png


def eval_doc(model_dir) -> dict:
    """A comparison in `mixq eval --output DIR`'s shape (DIR/comparison.json: roles with lm-eval's layout)."""
    def res(hashhop, kl=None, n=8):
        out = {"results": {"hashhop": {"acc,none": hashhop, "acc_stderr,none": 0.1, "sample_len": n}}}
        if kl is not None:
            out["results"]["kl"] = {"kl_mean,none": kl, "kl_mean_stderr,none": 0.001, "sample_len": n}
        return out

    def role(name, fp, size, lm, score, missing=()):
        return {"model": {"name": name, "fingerprint": fp, "size_bytes": size}, "lm_eval": lm,
                "capability": {"score": score, "partial": True, "present": ["hashhop"], "missing": list(missing)},
                "verdicts": {}}
    doc = {
        "tasks": ["hashhop", "kl"], "titles": {"hashhop": "HashHop", "kl": "KL vs reference"}, "sample_data": [],
        "versions": {"mixq": "0.1.0", "mlx": "0.32.4", "mlx-lm": "0.32.2", "lm-eval": "0.4.13"},
        "roles": {"reference": role("tiny-float", "e" * 64, 310932, res(0.875), 87.5),
                  "baseline": role("tiny-4bit", "f" * 64, 97311, res(0.625, 0.0211), 62.5),
                  "model": role(str(model_dir), fingerprint(model_dir), 93546, res(0.75, 0.0123), 75.0,
                                ["mmlu", "gsm8k", "ifeval", "bfcl", "humaneval"])},
    }
    doc["roles"]["model"]["verdicts"] = {"hashhop": {"verdict": "Fail", "change": 12.5, "rule": "points"},
                                         "kl": {"verdict": "Pass", "change": 0.0123, "rule": "kl"}}
    return doc


@pytest.fixture(scope="module")
def quant(nemotron_dense, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "tiny-mixq"
    convert(ConvertOptions(model=str(nemotron_dense), out=str(out), samples=4, seq_len=32, heldout_samples=4,
                           progress=False, command=["mixq", "convert", "tiny", "-o", "tiny-mixq"]))
    return out


@pytest.fixture(scope="module")
def base(nemotron_dense, tmp_path_factory):
    """The float model as it sits in a Hugging Face cache, with a card that has a license."""
    d = tmp_path_factory.mktemp("hub") / "models--acme--tiny-base" / "snapshots" / "abc123"
    shutil.copytree(nemotron_dense, d)
    (d / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n- ja\n---\n\n# tiny base\n")
    return d


@pytest.fixture(scope="module")
def full(quant, base, tmp_path_factory):
    """The quant with bench (float and mixed KV), kv_config.json and eval results; the card written."""
    d = shutil.copytree(quant, tmp_path_factory.mktemp("full") / "tiny-mixq")
    kv = save_kv(uniform_config(load(d), 8, 4), d / "kv_config.json")
    opts = dict(prompt_tokens=[8, 16], gen_tokens=4, runs=2, warmup=1)
    run_bench(BenchOptions(model=str(d), **opts))
    run_bench(BenchOptions(model=str(d), kv_config=str(kv), **opts))
    (d / "mixq" / "eval.json").write_text(json.dumps(eval_doc(d)))
    res = make_card(d, base=str(base), repo_id="acme/tiny-mixq")
    return d, res


def _doc(d):
    return {n: json.loads((d / "mixq" / f"{n}.json").read_text()) for n in ("plan", "report", "bench", "eval")}


def _rows(text, first_cell):
    """Cells of markdown table rows whose first cell starts with `first_cell`."""
    out = []
    for line in text.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0].startswith(first_cell):
                out.append(cells)
    return out


def test_front_matter(full):
    d, res = full
    text = (d / "README.md").read_text()
    fm = yaml.safe_load(text.split("---\n")[1])
    assert fm["license"] == "apache-2.0" and fm["language"] == ["en", "ja"]
    assert fm["base_model"] == "acme/tiny-base" and fm["base_model_relation"] == "quantized"
    assert fm["library_name"] == "mlx" and fm["pipeline_tag"] == "text-generation"
    assert {"mlx", "mixq", "nemotron_h", "kv-cache-quantization"} <= set(fm["tags"])
    assert res["license"] == "apache-2.0" and res["left_out"] == []
    assert "## Not measured" not in text


def test_quants_table_matches_report_json(full):
    d, _ = full
    text, docs = (d / "README.md").read_text(), _doc(d)
    rows = docs["report"]["comparison"]
    ref = next(r for r in rows if r["name"] == "uniform 4:64")
    for r in rows:
        cells = _rows(text, "**this model (mixq)**" if r["name"] == "mixq" else r["name"])[0]
        assert cells[1] == f"{r['bpw']:.3f}"
        assert cells[3] == f"{r['kl_mean']:.4g}" and cells[4] == f"{r['top1']:.4g}" and cells[5] == f"{r['ppl']:.4g}"
        kb = r["bytes"] / 1e3
        assert cells[2] == (f"{kb:.1f} KB" if kb < 1e3 else f"{kb / 1e3:.2f} MB")
        if r is not ref:
            assert cells[6] == f"{(r['kl_mean'] - ref['kl_mean']) / ref['kl_mean'] * 100:+.1f}%"
    mixq = _rows(text, "**this model (mixq)**")[0]
    assert mixq[7] == "75" and mixq[8] == "+12.5"  # Capability Score and delta, from eval.json's summary
    assert all(c[7] == "—" for c in _rows(text, "uniform"))  # not evaluated: not filled in
    assert _rows(text, "eval baseline: tiny-4bit")[0][7] == "62.5"
    plan = docs["plan"]
    assert f"The result is {plan['achieved_bpw']:.3f} bpw" in text and f"{plan['target_bpw']:g} bits-per-weight" in text


def test_benchmark_breakdown_matches_eval_json(full):
    d, _ = full
    text = (d / "README.md").read_text()
    hh = _rows(text, "HashHop")[0]
    # reference, baseline, this model (accuracies in percent, as mixq eval shows them), delta, verdict
    assert hh[3:] == ["87.5", "62.5", "75", "+12.5", "Fail (-12.5 pt)"]
    kl = _rows(text, "KL vs reference")[0]
    assert kl[3:] == ["—", "0.0211", "0.0123", "-0.0088", "Pass (KL 0.0123)"]
    cap = _rows(text, "**Capability Score**")[0]
    assert cap[3:7] == ["87.5", "62.5", "**75**", "+12.5"]
    assert "mmlu, gsm8k, ifeval, bfcl, humaneval did not run" in text


def test_kv_and_speed_tables_match_their_json(full):
    d, _ = full
    text, bench = (d / "README.md").read_text(), _doc(d)["bench"]
    kv = json.loads((d / "kv_config.json").read_text())
    kv_rows = [r for r in _rows(text, "") if len(r) == 5 and r[0].isdigit()]
    assert kv_rows == [[str(e["layer"]), str(e["cache_slot"]), str(e["k_bits"]), str(e["v_bits"]),
                        str(e["bytes_per_token"])] for e in kv["layers"]]
    assert f"{kv['bytes_per_token']} bytes per token against {kv['float16_bytes_per_token']} in 16-bit" in text
    assert len(bench["benchmarks"]) == 2
    speed = [r for r in _rows(text, "") if len(r) == 6 and r[0].isdigit()]
    expected = []
    for e in bench["benchmarks"]:
        for r in e["results"]:
            c = lambda k, f, s=1.0: f"{r[k]['median'] / s:{f}} ({r[k]['min'] / s:{f}}–{r[k]['max'] / s:{f}})"
            expected.append([str(r["prompt_tokens"]), str(r["gen_tokens"]), c("prompt_tps", ".1f"),
                             c("generation_tps", ".1f"), c("ttft_s", ".3f"), c("peak_memory_bytes", ".1f", 1e6)])
    assert speed == expected
    assert "mixed KV cache (7 bits avg)" in text and "float KV cache" in text


def test_plot_is_a_valid_png_of_the_right_size(full):
    d, res = full
    path = d / "mixq" / "quality_vs_size.png"
    assert res["plot"] == str(path)
    data = path.read_bytes()
    png = parse_png(data)
    assert (png["width"], png["height"]) == (720, 440) == read_png_size(data)
    assert "![held-out KL against bits per weight](mixq/quality_vs_size.png)" in (d / "README.md").read_text()


def test_usage_and_provenance(full):
    d, _ = full
    text, plan = (d / "README.md").read_text(), _doc(d)["plan"]
    assert 'load("acme/tiny-mixq")' in text and "mixq serve acme/tiny-mixq" in text
    assert "curl http://127.0.0.1:8000/v1/chat/completions" in text and '"model": "acme/tiny-mixq"' in text
    assert "mixq convert tiny -o tiny-mixq" in text
    assert plan["calibration"]["sha256"] in text and plan["heldout"]["sha256"] in text
    for k, v in plan["versions"].items():
        assert f"| convert: {k} | {v} |" in text


def test_card_is_deterministic_and_keeps_its_own_readme(full, base):
    d, _ = full
    first = (d / "README.md").read_text()
    make_card(d, base=str(base), repo_id="acme/tiny-mixq")
    assert (d / "README.md").read_text() == first


def test_missing_results_are_named_not_invented(quant, tmp_path):
    d = shutil.copytree(quant, tmp_path / "bare")
    res = make_card(d)
    text = (d / "README.md").read_text()
    assert "## Not measured" in text
    for what in ("mixq/bench.json", "mixq/eval*.json", "kv_config.json", "license: not found"):
        assert any(what in line for line in res["left_out"]), what
        assert what in text
    assert "Capability Score" in text and "license:" not in text.split("---\n")[1]
    assert all(c[7] == "—" for c in _rows(text, "**this model") + _rows(text, "uniform"))
    assert "Not measured: no `mixq/bench.json`" in text and "Not measured: no eval results" in text
    assert "base_model:" not in text  # the source is a local path, not a hub id


def test_a_plain_model_dir_gets_a_card_without_numbers(nemotron_dense, tmp_path):
    d = shutil.copytree(nemotron_dense, tmp_path / "plain")
    res = make_card(d)
    text = (d / "README.md").read_text()
    assert res["plot"] is None and "convert results (mixq/plan.json, mixq/report.json)" in text
    assert "bpw" not in text.split("## Quants")[1].split("##")[0]


def test_foreign_readme_needs_force(quant, tmp_path):
    d = shutil.copytree(quant, tmp_path / "own")
    (d / "README.md").write_text("# my notes\n")
    with pytest.raises(MixqError, match="--force"):
        make_card(d)
    make_card(d, force=True)
    assert MARKER in (d / "README.md").read_text()


def test_unreadable_and_stale_results_are_reported(quant, tmp_path):
    d = shutil.copytree(quant, tmp_path / "stale")
    doc = eval_doc(d)
    doc["roles"]["model"]["model"]["fingerprint"] = "0" * 64
    (d / "mixq" / "eval.json").write_text(json.dumps(doc))
    (d / "mixq" / "eval-broken.json").write_text("{not json")
    (d / "mixq" / "eval-other.json").write_text(json.dumps({"hello": 1}))
    res = make_card(d)
    joined = "\n".join(res["left_out"])
    assert "eval-broken.json: unreadable" in joined and "eval-other.json: no recognisable" in joined
    assert "eval.json: measured on files with fingerprint 000000000000" in joined
    assert res["evals"] == ["eval.json"]


def test_cli(quant, tmp_path, capsys):
    d = shutil.copytree(quant, tmp_path / "cli")
    extra = tmp_path / "elsewhere.json"
    extra.write_text(json.dumps({"model": "x", "tasks": {"hashhop": {"score": 40.0}}, "capability_score": 40.0}))
    assert main(["card", str(d), "--eval", str(extra), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["readme"] == str(d / "README.md") and out["evals"] == ["elsewhere.json"]
    assert main(["card", str(tmp_path / "missing")]) == 2
    capsys.readouterr()
    assert main(["card", str(d), "--base", "acme/not-cached"]) == 0  # offline: said, not invented
    text = (d / "README.md").read_text()
    assert 'base_model: "acme/not-cached"' in text and "could not be read" in text and "license:" not in text.split("---\n")[1]


def test_normalize_eval_shapes():
    simple = normalize_eval({"model": "m", "tasks": [{"task": "mmlu", "accuracy": 0.5}, {"name": "gsm8k", "score": 0.25}],
                             "capability_score": {"score": 37.5}, "baseline": {"model": "b", "tasks": {"mmlu": 0.4}}})
    assert simple["tasks"] == {"mmlu": 0.5, "gsm8k": 0.25} and simple["capability_score"] == 37.5
    assert simple["baseline"]["tasks"] == {"mmlu": 0.4}
    beside = normalize_eval({"results": {"mmlu": {"score": 0.5, "baseline": 0.45}}})
    assert beside["baseline"]["tasks"] == {"mmlu": 0.45}
    assert normalize_eval({"tasks": {"mmlu": "n/a"}}) is None and normalize_eval([1, 2]) is None


def test_card_reads_a_real_mixq_eval_result(quant, tmp_path):
    from mixq.eval import runner
    d = shutil.copytree(quant, tmp_path / "real")
    from mixq.eval import results

    doc = runner.run_eval(runner.EvalOptions(model=str(d), tasks="hashhop", limit=2, progress=False, cache_dir=None,
                                             hashhop_sizes="256", output=str(d / "mixq" / "eval")))
    make_card(d)
    text = (d / "README.md").read_text()
    assert _rows(text, "HashHop") and "Not measured: no eval results" not in text
    score = doc["roles"]["model"]["capability"]["score"]
    assert results.dumps(results.public(doc))
    assert _rows(text, "**this model (mixq)**")[0][7] == f"{score:.4g}"


def test_card_on_a_demo_model_quant(tmp_path):
    """The acceptance path on the bundled demo model."""
    q = tmp_path / "demo-mixq"
    convert(ConvertOptions(model="demo", out=str(q), target_bpw=6.0, candidates="4:64,8:64", samples=2, seq_len=32,
                           heldout_samples=2, progress=False))
    run_bench(BenchOptions(model=str(q), prompt_tokens=[16], gen_tokens=4, runs=2, warmup=1))
    (q / "mixq" / "eval.json").write_text(json.dumps(eval_doc(q)))
    res = make_card(q, base="demo")
    text = (q / "README.md").read_text()
    report = json.loads((q / "mixq" / "report.json").read_text())
    mixq = _rows(text, "**this model (mixq)**")[0]
    assert mixq[1] == f"{report['comparison'][0]['bpw']:.3f}" and mixq[3] == f"{report['comparison'][0]['kl_mean']:.4g}"
    assert mixq[7] == "75" and _rows(text, "HashHop")[0][5] == "75"
    r = json.loads((q / "mixq" / "bench.json").read_text())["benchmarks"][0]["results"][0]
    assert f"{r['prompt_tps']['median']:.1f} (" in text
    assert read_png_size((q / "mixq" / "quality_vs_size.png").read_bytes()) == (720, 440)
    assert res["evals"] == ["eval.json"] and res["bench_entries"] == 1
