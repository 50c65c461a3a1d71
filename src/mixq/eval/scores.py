"""What is graded for each task, read from lm-eval's result layout: the headline metric, its standard
error and n, and the per-sample values that pair two models' results on the same items.

Every role's results use lm-eval's layout (`results[task]["<metric>,<filter>"]`, `..._stderr,<filter>`,
`n-samples`, per-sample records with `doc_id`, `filter` and the metric's value), mixq's own tasks included,
so one reader serves all. Standard errors are lm-eval's where it gives one; where it gives none
(perplexities, KL) they are computed from the samples: a ratio estimator over documents (windows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Headline:
    key: str                 # "<metric>,<filter>" in lm-eval's results
    label: str
    higher_is_better: bool = True
    percent: bool = True     # a fraction in [0, 1], shown (and averaged) in percent
    rule: str = "points"     # how a change is judged: points | relative | kl (mixq.eval.table)
    kind: str = "mean"       # per-sample values: mean (0/1 or scores) | ratio (summed nll, count) | kl


ACC = Headline("acc,none", "accuracy %")
HEADLINES: dict[str, Headline] = {
    "mmlu": Headline("acc,none", "accuracy %"),
    "gsm8k_cot": Headline("exact_match,flexible-extract", "exact match % (flexible)"),
    "gsm8k": Headline("exact_match,flexible-extract", "exact match % (flexible)"),
    "ifeval": Headline("prompt_level_strict_acc,none", "prompt-level strict %"),
    "humaneval": Headline("pass@1,create_test", "pass@1 %"),
    "humaneval_instruct": Headline("pass@1,create_test", "pass@1 %"),
    "hashhop": Headline("acc,none", "exact match % (greedy)"),
    "ja_leaderboard_jcommonsenseqa": ACC,
    "wikitext": Headline("word_perplexity,none", "word perplexity", False, False, "relative", "ratio"),
    "bfcl": Headline("accuracy,none", "AST accuracy %"),
    "kl": Headline("kl_mean,none", "mean KL (nats/token)", False, False, "kl", "kl"),
}
# further rows shown under a task: (result key, label, percent)
EXTRAS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "gsm8k_cot": (("exact_match,strict-match", "strict-match %", True),),
    "gsm8k": (("exact_match,strict-match", "strict-match %", True),),
    "ifeval": (("inst_level_strict_acc,none", "instruction-level strict %", True),
               ("prompt_level_loose_acc,none", "prompt-level loose %", True)),
    "wikitext": (("byte_perplexity,none", "byte perplexity", False), ("bits_per_byte,none", "bits per byte", False)),
    "kl": (("kl_p99,none", "KL p99", False), ("top1,none", "top-1 agreement %", True)),
}
CAPABILITY = ("mmlu", "gsm8k_cot", "ifeval", "bfcl", "humaneval", "hashhop")


def headline(task: str, res: dict | None = None) -> Headline:
    """The task's headline; for a task mixq has no entry for, the first metric lm-eval reports."""
    if task in HEADLINES:
        return HEADLINES[task]
    if task.startswith("hashhop_hop"):
        return HEADLINES["hashhop"]
    if task.startswith("mmlu_") or task.startswith("humaneval"):
        return HEADLINES["mmlu" if task.startswith("mmlu_") else "humaneval"]
    entry = ((res or {}).get("results") or {}).get(task, {})
    keys = [k for k in entry if "," in k and "_stderr" not in k]
    if not keys:
        return ACC
    key = keys[0]
    metric = key.split(",")[0]
    hib = ((res or {}).get("higher_is_better") or {}).get(task, {}).get(metric, True)
    value = entry[key]
    percent = isinstance(value, (int, float)) and 0 <= value <= 1 and "perplexity" not in metric
    return Headline(key, metric, bool(hib), percent, "points" if percent else "relative", "mean")


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def value(res: dict, task: str, key: str | None = None) -> float | None:
    key = key or headline(task, res).key
    return _num(((res.get("results") or {}).get(task) or {}).get(key))


def count(res: dict, task: str) -> int | None:
    entry = (res.get("results") or {}).get(task) or {}
    if "sample_len" in entry:
        return int(entry["sample_len"])
    ns = (res.get("n-samples") or {}).get(task)
    return int(ns["effective"]) if ns else None


def samples(res: dict, task: str, key: str) -> dict:
    """{item id: per-sample value} for a task or group (its leaves' samples), for the key's filter."""
    metric, _, filt = key.partition(",")
    subtasks = (res.get("group_subtasks") or {}).get(task)
    out: dict = {}
    if subtasks:
        for sub in subtasks:
            out |= {(sub, k) if not isinstance(k, tuple) else k: v for k, v in samples(res, sub, key).items()}
        return out
    for rec in (res.get("samples") or {}).get(task, []):
        if rec.get("filter", "none") == (filt or "none") and metric in rec:
            out[(task, rec["doc_id"])] = rec[metric]
    return out


def stderr(res: dict, task: str) -> float | None:
    """The headline's standard error: lm-eval's, else from the samples (ratio metrics, KL)."""
    h = headline(task, res)
    metric, _, filt = h.key.partition(",")
    se = _num(((res.get("results") or {}).get(task) or {}).get(f"{metric}_stderr,{filt}"))
    if se is not None:
        return se
    if h.kind in ("ratio", "kl"):
        return ratio_stderr(list(samples(res, task, h.key).values()), h.kind)
    return None


def _ratio_terms(vals: list, kind: str) -> tuple[list[float], list[float]]:
    """(numerators, denominators): summed -loglik and words for perplexities; KL sum and positions."""
    if kind == "ratio":
        return [-float(v[0]) for v in vals], [float(v[1]) for v in vals]
    return [float(v[0]) for v in vals], [float(v[1]) for v in vals]


def ratio_se(num: list[float], den: list[float]) -> float | None:
    """Standard error of sum(num) / sum(den) over independent items (linearised ratio estimator)."""
    n = len(num)
    if n < 2 or sum(den) <= 0:
        return None
    r = sum(num) / sum(den)
    resid = sum((a - r * b) ** 2 for a, b in zip(num, den))
    return math.sqrt(n / (n - 1) * resid) / sum(den)


def ratio_stderr(vals: list, kind: str) -> float | None:
    """For a perplexity: exp(mean nll) times the standard error of the mean nll; for KL: of the mean."""
    num, den = _ratio_terms(vals, kind)
    se = ratio_se(num, den)
    if se is None:
        return None
    return math.exp(sum(num) / sum(den)) * se if kind == "ratio" else se


def mean_se(diffs: list[float]) -> float | None:
    n = len(diffs)
    if n < 2:
        return None
    m = sum(diffs) / n
    return math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1) / n)


def paired_change_se(a: dict, b: dict, h: Headline) -> tuple[float | None, int]:
    """Standard error of the change from b (reference) to a on the items both have, in the verdict's
    unit (points of percent, or relative change of a perplexity), and how many items were paired."""
    common = sorted(set(a) & set(b), key=str)
    if len(common) < 2:
        return None, len(common)
    if h.kind == "ratio":
        na, da = _ratio_terms([a[k] for k in common], "ratio")
        nb, _ = _ratio_terms([b[k] for k in common], "ratio")
        diff = [x - y for x, y in zip(na, nb)]
        se = ratio_se(diff, da)
        if se is None:
            return None, len(common)
        return math.exp(sum(diff) / sum(da)) * se, len(common)
    scale = 100.0 if h.percent else 1.0
    se = mean_se([scale * (float(a[k]) - float(b[k])) for k in common])
    return se, len(common)
