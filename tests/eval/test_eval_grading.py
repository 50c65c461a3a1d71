"""Verdicts: the cards' two examples, the two-standard-error rule, thresholds, paired standard errors,
the Capability Score - on result dicts in lm-eval's layout."""

import math

import pytest

from mixq.core.errors import MixqError
from mixq.eval import scores
from mixq.eval.table import capability, grade, parse_thresholds, verdict


def _acc_result(task: str, correct: list[int]) -> dict:
    """An lm-eval result for one accuracy task: value, lm-eval's standard error, per-sample records."""
    n, p = len(correct), sum(correct) / len(correct)
    return {"results": {task: {"acc,none": p, "acc_stderr,none": math.sqrt(p * (1 - p) / (n - 1)), "sample_len": n}},
            "samples": {task: [{"doc_id": i, "filter": "none", "acc": float(c)} for i, c in enumerate(correct)]}}


def _ppl_result(nll: list[float], words: list[int]) -> dict:
    ppl = math.exp(sum(nll) / sum(words))
    return {"results": {"wikitext": {"word_perplexity,none": ppl, "word_perplexity_stderr,none": "N/A",
                                     "sample_len": len(nll)}},
            "samples": {"wikitext": [{"doc_id": i, "filter": "none", "word_perplexity": (-x, w)}
                                     for i, (x, w) in enumerate(zip(nll, words))]}}


def test_card_examples():
    """WikiText-2 word perplexity 10.11 -> 10.82 (+7.0 %) is a Pass; JCommonsenseQA 79.6 % -> 75.4 %
    (-4.2 pt) on its 1,119 validation questions is a Warn."""
    words = [2000] * 60
    ref = _ppl_result([2000 * math.log(10.11)] * 60, words)
    quant = _ppl_result([2000 * math.log(10.82)] * 60, words)
    v = verdict("wikitext", quant, ref)
    assert v["verdict"] == "Pass" and v["change"] == pytest.approx(0.0702, abs=1e-3)

    n = 1119
    ref_c = [1] * round(0.796 * n) + [0] * (n - round(0.796 * n))
    quant_c = [1] * round(0.754 * n) + [0] * (n - round(0.754 * n))
    task = "ja_leaderboard_jcommonsenseqa"
    ref_r, quant_r = _acc_result(task, ref_c), _acc_result(task, quant_c)
    v = verdict(task, quant_r, ref_r)
    assert v["verdict"] == "Warn" and v["change"] == pytest.approx(4.2, abs=0.05) and v["n"] == n
    # the same numbers without per-item pairing: the two standard errors combined still put it past 2 SE
    for r in (ref_r, quant_r):
        r["samples"] = {}
    v = verdict(task, quant_r, ref_r)
    assert v["verdict"] == "Warn" and 2 * v["stderr"] < 4.2


def test_noise_rule_and_grades():
    assert grade(1.9, 0.1, 100, "points")["verdict"] == "Pass"
    assert grade(4.0, 1.0, 100, "points")["verdict"] == "Warn"
    assert grade(6.0, 1.0, 100, "points")["verdict"] == "Fail"
    noisy = grade(6.0, 4.0, 12, "points")
    assert noisy["verdict"] == "within noise" and noisy["wanted"] == "Fail" and noisy["n"] == 12
    assert grade(6.0, None, 12, "points")["verdict"] == "within noise"
    assert grade(0.30, 0.01, 50, "relative")["verdict"] == "Fail"
    assert grade(0.10, None, 5, "kl")["verdict"] == "within noise"
    # a small sample: 2 of 5 right vs 4 of 5 is -40 pt, not beyond two standard errors at n = 5
    v = verdict("mmlu", _acc_result("mmlu", [1, 0, 0, 0, 1]), _acc_result("mmlu", [1, 1, 1, 1, 0]))
    assert v["change"] == pytest.approx(40.0) and v["verdict"] == "within noise"


def test_paired_standard_errors():
    h = scores.headline("mmlu")
    a = {i: float(i % 2) for i in range(10)}
    assert scores.paired_change_se(a, a, h) == (0.0, 10)
    b = {i: 1.0 for i in range(10)}
    se, n = scores.paired_change_se(a, b, h)
    assert n == 10 and se == pytest.approx(100 * math.sqrt(0.25 * 10 / 9 / 10))
    # ratio: identical per-doc increases give a zero standard error of the relative change
    hp = scores.headline("wikitext")
    ra = {i: (-110.0, 100) for i in range(5)}
    rb = {i: (-100.0, 100) for i in range(5)}
    se, _ = scores.paired_change_se(ra, rb, hp)
    assert se == pytest.approx(0.0, abs=1e-12)
    assert scores.ratio_stderr([(-100.0, 50), (-300.0, 50)], "ratio") > 0


def test_thresholds_are_configurable():
    t = parse_thresholds("points=1:3,relative=5%:20%")
    assert t["points"]["pass"] == 1 and t["relative"]["warn"] == pytest.approx(0.20)
    assert grade(0.07, 0.001, 10, "relative", t)["verdict"] == "Warn"
    for bad in ("points=3:1", "nope=1:2", "points=x"):
        with pytest.raises(MixqError):
            parse_thresholds(bad)


def test_capability_score():
    res = {"results": {}}
    for t, p in zip(scores.CAPABILITY, (0.5, 0.2, 0.3, 0.4, 0.1, 0.6)):
        key = scores.headline(t).key
        res["results"][t] = {key: p, key.replace(",", "_stderr,", 1): 0.01}
    cap = capability(res, list(scores.CAPABILITY))
    assert cap["score"] == pytest.approx(35.0) and not cap["partial"]
    assert cap["stderr"] == pytest.approx(100 * math.sqrt(6 * 0.01 ** 2) / 6)
    part = capability(res, ["mmlu", "ifeval"])
    assert part["partial"] and part["present"] == ["ifeval", "mmlu"] and part["score"] == pytest.approx(40.0)
