"""`mixq eval` end to end on the fixtures: table with baseline, deltas, sizes and verdicts; JSON with
per-sample records; the per-sample cache resumes an interrupted run; user errors are one line, exit 2."""

import json

import pytest

from mixq.cli import main


@pytest.fixture(scope="module")
def dense_q4(nemotron_dense, tmp_path_factory):
    """A uniform 4-bit g64 quant of the dense fixture, written by mlx-lm."""
    import mixq  # noqa: F401
    from mlx_lm.utils import load, quantize_model, save

    out = tmp_path_factory.mktemp("q4") / "dense-q4"
    model, tok, config = load(str(nemotron_dense), return_config=True)
    model, config = quantize_model(model, config, group_size=64, bits=4)
    save(out, nemotron_dense, model, tok, config)
    return out


def _eval(args, capsys):
    rc = main(["eval", *args, "--quiet"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_compare_table_json_and_resume(nemotron_dense, dense_q4, tmp_path, capsys):
    out = tmp_path / "eval.json"
    cache = tmp_path / "cache"
    args = [str(dense_q4), "--baseline", str(dense_q4), "--reference", str(nemotron_dense),
            "--tasks", "perplexity,kl,hashhop", "--limit", "2", "--max-tokens", "4", "--seq-len", "64",
            "--cache-dir", str(cache), "-o", str(out)]
    rc, table, err = _eval(args, capsys)
    assert rc == 0, err
    head = table.splitlines()[0]
    for col in ("reference", "baseline", "model", "Δ model − baseline", "verdict: baseline", "verdict: model"):
        assert col in head
    assert "| perplexity | word ppl ↓ | 2 |" in table and "byte ppl" in table
    assert "KL mean" in table and "KL p99" in table and "top-1 agreement" in table
    assert "size on disk" in table and "Capability Score** (partial: 1/6)" in table
    assert "Pass ≤ 1.0 pt" in table  # thresholds are stated
    doc = json.loads(out.read_text())
    res = doc["results"]
    assert set(res) == {"reference", "baseline", "model"} and "kl" not in res["reference"]
    kl = res["model"]["kl"]
    assert kl["n"] == 2 and len(kl["samples"]) == 2 and 0 < kl["metrics"]["kl_mean"] < 1
    assert 0 <= kl["metrics"]["top1"] <= 1 and kl["metrics"]["kl_median"] <= kl["metrics"]["kl_p99"]
    assert doc["models"]["baseline"]["size_bytes"] < doc["models"]["reference"]["size_bytes"]
    assert doc["summary"]["verdicts"]["model"]["kl"]["verdict"] in ("Pass", "Warn", "Fail")
    assert doc["summary"]["capability"]["model"]["missing"] == ["mmlu", "gsm8k", "ifeval", "bfcl", "humaneval"]
    hh = res["model"]["hashhop"]["samples"]
    assert {r["hops"] for r in hh} == {1, 2} and all(r["target"] for r in hh)

    # interrupted: drop the last record of the model's kl cache (and tear a line); the rerun resumes
    kl_cache = next(p for p in cache.rglob("kl-*.jsonl"))
    lines = kl_cache.read_text().splitlines()
    kl_cache.write_text(lines[0] + "\n" + lines[1][:20])
    rc, table2, _ = _eval(args, capsys)
    assert rc == 0
    doc2 = json.loads(out.read_text())
    # the baseline runs first and redoes the missing window; the model (same weights) then finds both
    assert doc2["results"]["baseline"]["kl"]["cached"] == 1
    assert doc2["results"]["model"]["kl"]["cached"] == 2 and doc2["results"]["model"]["hashhop"]["cached"] == 2
    assert doc2["results"]["model"]["kl"]["metrics"] == pytest.approx(kl["metrics"], rel=1e-3)
    assert len(kl_cache.read_text().splitlines()) == 2


def test_self_reference_is_zero_kl(nemotron_dense, tmp_path, capsys):
    rc, table, err = _eval([str(nemotron_dense), "--reference", str(nemotron_dense), "--tasks", "kl",
                            "--limit", "1", "--seq-len", "32", "--no-cache", "--json"], capsys)
    assert rc == 0, err
    m = json.loads(table)["results"]["model"]["kl"]["metrics"]
    assert m["kl_mean"] < 1e-5 and m["top1"] == 1.0 and m["ppl"] == pytest.approx(m["ref_ppl"])


def test_user_errors(nemotron_dense, tmp_path, capsys):
    cases = [
        [str(nemotron_dense), "--tasks", "kl"],                  # kl without --reference
        [str(nemotron_dense), "--tasks", "nope"],                # unknown task
        [str(nemotron_dense), "--tasks", "hashhop", "--limit", "0"],
        [str(tmp_path / "missing-model"), "--tasks", "hashhop"],
        [str(nemotron_dense), "--tasks", "perplexity", "--text", str(tmp_path / "none.txt")],
        [str(nemotron_dense), "--tasks", "mmlu", "--data-dir", str(tmp_path / "nodir")],
        ["--tasks", "hashhop"],                                  # no model
    ]
    for argv in cases:
        rc, _, err = _eval([*argv, "--no-cache"], capsys)
        assert rc == 2 and err.startswith("mixq eval: error:") and err.count("\n") == 1, (argv, err)


def test_list_tasks(capsys):
    assert main(["eval", "--list-tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("perplexity", "kl", "hashhop"):
        assert name in out


def test_kv_config_is_used(nemotron_dense, tmp_path, capsys):
    """--kv-config runs the model through mixq.kvcache's mixed-precision cache (generation and logits)."""
    from mixq.core.modelio import load
    from mixq.kvcache import uniform_config

    kv = tmp_path / "kv.json"
    kv.write_text(json.dumps(uniform_config(load(nemotron_dense), 4)))
    args = [str(nemotron_dense), "--reference", str(nemotron_dense), "--tasks", "kl,hashhop", "--limit", "1",
            "--seq-len", "48", "--max-tokens", "3", "--no-cache", "--json"]
    rc, out, err = _eval([*args, "--kv-config", str(kv)], capsys)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["models"]["model"]["kv_config"] is True
    assert doc["results"]["model"]["kl"]["metrics"]["kl_mean"] > 1e-6  # 4-bit K/V moves the distributions
    assert doc["results"]["model"]["hashhop"]["samples"][0]["finish"] in ("stop", "length")
    other = tmp_path / "other.json"
    cfg = json.loads(kv.read_text())
    cfg["model"]["fingerprint"] = "0" * 64
    other.write_text(json.dumps(cfg))
    rc, _, err = _eval([*args, "--kv-config", str(other)], capsys)
    assert rc == 2 and err.count("\n") == 1
