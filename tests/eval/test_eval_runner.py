"""`mixq eval` end to end on the fixtures: the table with baseline, reference, standard errors, sizes and
verdicts; lm-eval's result and sample files; the caches answer a second run; user errors are one line."""

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


def test_compare_table_results_and_resume(nemotron_dense, dense_q4, tmp_path, capsys):
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    args = [str(dense_q4), "--baseline", str(dense_q4), "--reference", str(nemotron_dense),
            "--tasks", "wikitext,kl,hashhop,mmlu", "--limit", "2", "--seq-len", "64", "--hashhop-sizes", "512",
            "--cache-dir", str(cache), "-o", str(out)]
    rc, table, err = _eval(args, capsys)
    assert rc == 0, err
    head = table.splitlines()[0]
    for col in ("reference", "baseline", "model", "verdict: baseline", "verdict: model"):
        assert col in head
    assert "| WikiText-2 † | word perplexity ↓ | 2 |" in table and " ± " in table
    assert "mean KL" in table and "KL p99" in table and "1-hop %" in table
    assert "size on disk" in table and "Capability Score" not in table  # not asked for, 2 of 6 present
    assert "Pass ≤ 2.0 pt" in table and "mmlu: 3 of its 57 subtasks" in table
    # lm-eval's layout, per role: results / _stderr / n-shot / configs / versions, and samples files
    (res_file,) = (out / "model").glob("results_*.json")
    res = json.loads(res_file.read_text())
    for key in ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
                "n-samples"):
        assert key in res, key
    assert "word_perplexity_stderr,none" in res["results"]["wikitext"] and "kl_mean_stderr,none" in res["results"]["kl"]
    assert res["n-shot"]["mmlu_computer_security"] == 0 and res["versions"]["kl"] == "mixq-1"
    assert {p.name.split("_2")[0] for p in (out / "model").glob("samples_*.jsonl")} >= {
        "samples_wikitext", "samples_kl", "samples_hashhop_hop1", "samples_mmlu_computer_security"}
    assert not list((out / "reference").glob("samples_kl_*"))  # the reference is not compared with itself
    doc = json.loads((out / "comparison.json").read_text())
    v = doc["roles"]["model"]["verdicts"]
    assert v["wikitext"]["verdict"] in ("Pass", "Warn", "Fail", "within noise") and v["wikitext"]["n"] == 2
    assert doc["roles"]["baseline"]["model"]["size_bytes"] < doc["roles"]["reference"]["model"]["size_bytes"]
    kl = doc["roles"]["model"]["lm_eval"]["results"]["kl"]
    assert 0 < kl["kl_mean,none"] < 1 and kl["kl_median,none"] <= kl["kl_p99,none"]

    # a second run answers from the caches (lm-eval's request cache, mixq's per-sample cache): same numbers
    assert list((cache / "lm-eval").glob("*.db"))
    rc, table2, _ = _eval(args, capsys)
    assert rc == 0 and table2 == table


def test_self_reference_is_zero_kl(nemotron_dense, tmp_path, capsys):
    rc, table, err = _eval([str(nemotron_dense), "--reference", str(nemotron_dense), "--tasks", "kl",
                            "--limit", "1", "--seq-len", "32", "--no-cache", "--json"], capsys)
    assert rc == 0, err
    m = json.loads(table)["roles"]["model"]["lm_eval"]["results"]["kl"]
    assert m["kl_mean,none"] < 1e-5 and m["top1,none"] == 1.0 and m["ppl,none"] == pytest.approx(m["ref_ppl,none"])


def test_user_errors(nemotron_dense, tmp_path, capsys):
    cases = [
        [str(nemotron_dense), "--tasks", "kl"],                  # kl without --reference
        [str(nemotron_dense), "--tasks", "nope"],                # unknown task
        [str(nemotron_dense), "--tasks", "hashhop", "--limit", "0"],
        [str(tmp_path / "missing-model"), "--tasks", "hashhop"],
        [str(nemotron_dense), "--reference", str(nemotron_dense), "--tasks", "kl", "--text", str(tmp_path / "no.txt")],
        [str(nemotron_dense), "--tasks", "mmlu", "--data-dir", str(tmp_path / "nodir")],
        [str(nemotron_dense), "--tasks", "wikitext", "--data-dir", str(tmp_path)],   # no wiki.test.raw: no fallback
        [str(nemotron_dense), "--tasks", "hellaswag"],           # lm-eval task mixq has no local data for
        [str(nemotron_dense), "--tasks", "hashhop", "--hashhop-sizes", "64k"],  # beyond the context
        [str(nemotron_dense), "--tasks", "mmlu", "--thresholds", "points=5:1"],
        ["--tasks", "hashhop"],                                  # no model
    ]
    for argv in cases:
        rc, _, err = _eval([*argv, "--no-cache"], capsys)
        assert rc == 2 and err.startswith("mixq eval: error:") and err.count("\n") == 1, (argv, err)


def test_list_tasks(capsys):
    assert main(["eval", "--list-tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("wikitext", "mmlu", "gsm8k_cot", "ifeval", "humaneval", "ja_leaderboard_jcommonsenseqa", "hashhop",
                 "bfcl", "kl"):
        assert name in out


def test_kv_config_is_used(nemotron_dense, tmp_path, capsys):
    """--kv-config runs the model through mixq.kvcache's mixed-precision cache (generation and logits)."""
    from mixq.core.modelio import load
    from mixq.kvcache import uniform_config

    kv = tmp_path / "kv.json"
    kv.write_text(json.dumps(uniform_config(load(nemotron_dense), 4)))
    args = [str(nemotron_dense), "--reference", str(nemotron_dense), "--tasks", "kl,gsm8k_cot", "--limit", "1",
            "--seq-len", "48", "--max-tokens", "3", "--no-cache", "--json"]
    rc, out, err = _eval([*args, "--kv-config", str(kv)], capsys)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["roles"]["model"]["model"]["kv_config"] is True
    assert doc["roles"]["model"]["lm_eval"]["results"]["kl"]["kl_mean,none"] > 1e-6  # 4-bit K/V moves them
    assert doc["roles"]["model"]["lm_eval"]["n-samples"]["gsm8k_cot"]["effective"] == 1
    other = tmp_path / "other.json"
    cfg = json.loads(kv.read_text())
    cfg["model"]["fingerprint"] = "0" * 64
    other.write_text(json.dumps(cfg))
    rc, _, err = _eval([*args, "--kv-config", str(other)], capsys)
    assert rc == 2 and err.count("\n") == 1
