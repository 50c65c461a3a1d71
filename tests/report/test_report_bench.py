"""mixq bench: timings and peak memory per prompt length, medians over runs, bench.json kept per KV setting."""

import json
import shutil

import pytest

from mixq.cli import main
from mixq.core.modelio import fingerprint, load
from mixq.kvcache import uniform_config
from mixq.kvcache.config import save as save_kv
from mixq.report.bench import BenchOptions, prompt_ids, run_bench, save_entry, stats

SMALL = dict(prompt_tokens=[8, 16], gen_tokens=4, runs=2, warmup=1)


@pytest.fixture()
def model_copy(qwen3, tmp_path):
    return shutil.copytree(qwen3, tmp_path / "qwen3")


def test_stats_median_and_spread():
    s = stats([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"]) == (2.0, 1.0, 3.0)
    assert s["spread_pct"] == pytest.approx(100.0) and s["values"] == [3.0, 1.0, 2.0]


def test_prompt_is_exactly_n_tokens_of_real_text(qwen3):
    lm = load(qwen3)
    for n in (1, 7, 300):
        ids = prompt_ids(lm.tokenizer, n)
        assert len(ids) == n and all(isinstance(i, int) for i in ids)
    assert prompt_ids(lm.tokenizer, 50) == prompt_ids(lm.tokenizer, 50)


def test_bench_measures_and_saves(model_copy):
    e = run_bench(BenchOptions(model=str(model_copy), **SMALL))
    assert [r["prompt_tokens"] for r in e["results"]] == [8, 16]
    for r in e["results"]:
        assert r["gen_tokens"] == 4
        for k in ("ttft_s", "prompt_tps", "generation_tps", "peak_memory_bytes"):
            s = r[k]
            assert len(s["values"]) == 2 and s["min"] <= s["median"] <= s["max"] and s["min"] > 0
        # prompt tok/s is prompt tokens over time to first token, run by run
        for ttft, tps in zip(r["ttft_s"]["values"], r["prompt_tps"]["values"]):
            assert tps == pytest.approx(r["prompt_tokens"] / ttft)
        assert r["peak_memory_bytes"]["min"] >= e["model"]["weights_bytes"]  # weights are in MLX memory
    assert e["model"]["fingerprint"] == fingerprint(model_copy)
    assert e["environment"]["compute_dtype"] == "float32" and e["kv_config"] is None
    saved = json.loads((model_copy / "mixq" / "bench.json").read_text())
    assert e["saved"] == str(model_copy / "mixq" / "bench.json")
    assert saved["format"] == "mixq-bench/1" and len(saved["benchmarks"]) == 1
    assert saved["benchmarks"][0]["results"] == e["results"]


def test_bench_with_kv_config_keeps_one_entry_per_setting(model_copy):
    lm = load(model_copy)
    kv_path = save_kv(uniform_config(lm, 8, 4), model_copy / "kv_config.json")
    one = dict(SMALL, prompt_tokens=[8], runs=1)
    run_bench(BenchOptions(model=str(model_copy), **one))
    e = run_bench(BenchOptions(model=str(model_copy), kv_config=str(kv_path), **one))
    assert e["kv_config"]["achieved_bits"] == json.loads(kv_path.read_text())["achieved_bits"]
    run_bench(BenchOptions(model=str(model_copy), **one))  # replaces the float-KV entry
    doc = json.loads((model_copy / "mixq" / "bench.json").read_text())
    assert [b["kv_config"] is None for b in doc["benchmarks"]] == [False, True]


def test_moe_model_runs_on_cpu_in_float32(nemotron_moe, tmp_path):
    m = shutil.copytree(nemotron_moe, tmp_path / "moe")
    e = run_bench(BenchOptions(model=str(m), prompt_tokens=[8], gen_tokens=2, runs=1, warmup=0, save=False))
    assert e["saved"] is None and not (m / "mixq").exists()
    assert e["results"][0]["generation_tps"]["median"] > 0


def test_entries_from_other_weights_are_dropped(tmp_path):
    path = tmp_path / "bench.json"
    mk = lambda fp, kv: {"model": {"fingerprint": fp}, "environment": {"device": "cpu", "compute_dtype": "float32"},
                         "kv_config": kv, "results": []}
    save_entry(path, mk("a", None))
    save_entry(path, mk("a", {"sha256": "k", "quantize_after": 0}))
    assert len(json.loads(path.read_text())["benchmarks"]) == 2
    save_entry(path, mk("b", None))
    assert [b["model"]["fingerprint"] for b in json.loads(path.read_text())["benchmarks"]] == ["b"]


def test_cli_json_and_no_save(model_copy, capsys):
    assert main(["bench", str(model_copy), "--prompt-tokens", "8", "--gen-tokens", "3", "--runs", "1",
                 "--warmup", "0", "--no-save", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["results"][0]["prompt_tokens"] == 8 and doc["saved"] is None
    assert not (model_copy / "mixq").exists()


def test_cli_table(model_copy, capsys):
    assert main(["bench", str(model_copy), "--prompt-tokens", "8", "--gen-tokens", "2", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "prompt tok/s" in out and "wrote" in out


@pytest.mark.parametrize("argv", [["--prompt-tokens", "0"], ["--prompt-tokens", "a,b"], ["--runs", "0"],
                                  ["--gen-tokens", "0"]])
def test_bad_arguments_are_one_line_errors(qwen3, argv, capsys):
    assert main(["bench", str(qwen3), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixq bench: error:") and len(err.strip().splitlines()) == 1


def test_kv_config_for_another_model_is_refused(model_copy, nemotron_dense, tmp_path, capsys):
    other = save_kv(uniform_config(load(nemotron_dense), 8), tmp_path / "kv.json")
    assert main(["bench", str(model_copy), "--kv-config", str(other), "--runs", "1", "--prompt-tokens", "8"]) == 2
    assert "another model" in capsys.readouterr().err
