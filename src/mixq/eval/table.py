"""The comparison: Capability Score, degradation verdicts with their thresholds, and the markdown table.

Verdicts judge a quant against the float reference (`--reference`), per task:

* accuracy-type scores (percent): the drop in percentage points, Pass <= 1.0, Warn <= 3.0, else Fail;
* perplexity (lower is better): the relative increase, Pass <= +3 %, Warn <= +10 %, else Fail;
* KL(reference || quant), mean over held-out tokens: Pass <= 0.05 nats, Warn <= 0.15, else Fail.

The Capability Score is the unweighted mean (in percent) of the six headline scores in
`registry.CAPABILITY`; a run missing any of them is marked partial and says which are missing. On small
samples (`--limit`, the shipped sample data) a verdict is only as good as the sample: the table gives n.
"""

from __future__ import annotations

from mixq.eval.registry import CAPABILITY

THRESHOLDS = {
    "points": {"pass": 1.0, "warn": 3.0, "unit": "percentage points dropped vs reference"},
    "relative": {"pass": 0.03, "warn": 0.10, "unit": "relative increase vs reference"},
    "kl": {"pass": 0.05, "warn": 0.15, "unit": "mean KL(reference || quant), nats/token"},
}


def _grade(x: float, rule: str) -> str:
    t = THRESHOLDS[rule]
    return "Pass" if x <= t["pass"] else "Warn" if x <= t["warn"] else "Fail"


def headline(res: dict | None, task) -> float | None:
    if not res or task.metric not in res.get("metrics", {}):
        return None
    v = res["metrics"][task.metric]
    return None if v is None else float(v) * (100.0 if task.percent else 1.0)


def capability(results: dict, tasks_by_name: dict) -> dict:
    present = {n: headline(results.get(n), tasks_by_name[n]) for n in CAPABILITY if n in tasks_by_name}
    present = {n: v for n, v in present.items() if v is not None}
    missing = [n for n in CAPABILITY if n not in present]
    score = sum(present.values()) / len(present) if present else None
    return {"score": score, "partial": bool(missing), "present": sorted(present), "missing": missing}


def verdict(task, value: float | None, ref_value: float | None) -> dict | None:
    """{"verdict", "change", "rule"} for one quant's headline value, or None when it cannot be judged."""
    if value is None:
        return None
    if task.verdict == "kl":
        return {"verdict": _grade(value, "kl"), "change": value, "rule": "kl"}
    if ref_value is None:
        return None
    if task.verdict == "relative":
        if ref_value <= 0:
            return None
        change = value / ref_value - 1.0 if not task.higher_is_better else 1.0 - value / ref_value
        return {"verdict": _grade(change, "relative"), "change": change, "rule": "relative"}
    drop = (ref_value - value) if task.higher_is_better else (value - ref_value)
    return {"verdict": _grade(drop, "points"), "change": -drop, "rule": "points"}


def summarize(doc: dict, tasks) -> dict:
    by_name = {t.name: t for t in tasks}
    results = doc["results"]
    out: dict = {"capability": {}, "verdicts": {}, "thresholds": THRESHOLDS,
                 "size_bytes": {r: m.get("size_bytes") for r, m in doc["models"].items()}}
    for role, res in results.items():
        out["capability"][role] = capability(res, by_name)
    ref = results.get("reference")
    for role in ("baseline", "model"):
        if role not in results:
            continue
        vs = {}
        for t in tasks:
            v = verdict(t, headline(results[role].get(t.name), t), headline(ref.get(t.name), t) if ref else None)
            if v:
                vs[t.name] = v
        cap, ref_cap = out["capability"][role], out["capability"].get("reference")
        if cap["score"] is not None and ref_cap and ref_cap["score"] is not None \
                and cap["present"] == ref_cap["present"]:
            drop = ref_cap["score"] - cap["score"]
            vs["capability"] = {"verdict": _grade(drop, "points"), "change": -drop, "rule": "points"}
        out["verdicts"][role] = vs
    return out


# ------------------------------------------------------------------------------------------------ table

def _fmt(v: float | None, percent: bool, lower_is_better: bool = False) -> str:
    if v is None:
        return "—"
    if percent:
        return f"{v:.1f}"
    a = abs(v)
    return f"{v:.4f}" if a < 1 else f"{v:.3f}" if a < 100 else f"{v:.1f}"


def _delta(a: float | None, b: float | None, percent: bool) -> str:
    if a is None or b is None:
        return "—"
    d = a - b
    return ("+" if d >= 0 else "") + (f"{d:.1f}" if percent else f"{d:.4g}")


def _verdict_cell(v: dict | None) -> str:
    if not v:
        return "—"
    c = v["change"]
    detail = f"{c:+.1f} pt" if v["rule"] == "points" else f"{100 * c:+.1f}%" if v["rule"] == "relative" \
        else f"KL {c:.3g}"
    return f"{v['verdict']} ({detail})"


def markdown(doc: dict, tasks) -> str:
    results, summary = doc["results"], doc.get("summary") or summarize(doc, tasks)
    roles = [r for r in ("reference", "baseline", "model") if r in results]
    judged = [r for r in ("baseline", "model") if r in results and "reference" in results]
    has_kl_verdict = any(t.verdict == "kl" for t in tasks)
    judged = judged or ([r for r in ("baseline", "model") if r in results] if has_kl_verdict else [])
    both = "baseline" in results and "model" in results
    head = ["benchmark", "metric", "n"] + roles + (["Δ model − baseline"] if both else []) \
        + [f"verdict: {r}" for r in judged]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    sample_data = False

    def row(label, metric, n, values, percent, verdicts):
        cells = [label, metric, n] + [_fmt(values.get(r), percent) for r in roles]
        if both:
            cells.append(_delta(values.get("model"), values.get("baseline"), percent))
        cells += [_verdict_cell(verdicts.get(r)) for r in judged]
        lines.append("| " + " | ".join(cells) + " |")

    for t in tasks:
        ran = {r: results[r][t.name] for r in roles if t.name in results[r]}
        if not ran:
            continue
        any_res = next(iter(ran.values()))
        mark = ""
        if any_res["data"].get("sample_data"):
            mark, sample_data = " †", True
        arrow = "↑" if t.higher_is_better else "↓"
        values = {r: headline(ran.get(r), t) for r in roles}
        verdicts = {r: summary["verdicts"].get(r, {}).get(t.name) for r in judged}
        row(f"{t.title or t.name}{mark}", f"{t.metric_label} {arrow}", str(any_res["n"]), values, t.percent, verdicts)
        for key, label, percent, higher in getattr(t, "extra", ()):
            vals = {r: (ran[r]["metrics"].get(key) if r in ran else None) for r in roles}
            vals = {r: (None if v is None else float(v) * (100 if percent else 1)) for r, v in vals.items()}
            if all(v is None for v in vals.values()):
                continue
            row("", f"{label} {'↑' if higher else '↓'}", "", vals, percent, {})
    caps = summary["capability"]
    cap_vals = {r: caps[r]["score"] for r in roles if r in caps}
    if any(v is not None for v in cap_vals.values()):
        some = next(c for c in caps.values() if c["score"] is not None)
        label = "**Capability Score**" + (f" (partial: {len(some['present'])}/{len(CAPABILITY)})"
                                          if some["partial"] else "")
        row(label, "mean of " + ", ".join(some["present"]), "", cap_vals, True,
            {r: summary["verdicts"].get(r, {}).get("capability") for r in judged})
    sizes = {r: (doc["models"][r].get("size_bytes") or None) for r in roles}
    if any(sizes.values()):
        mb = {r: (s / 1e6 if s else None) for r, s in sizes.items()}
        cells = ["size on disk", "MB", ""] + [("—" if mb[r] is None else f"{mb[r]:.2f}") for r in roles]
        if both:
            cells.append(_delta(mb.get("model"), mb.get("baseline"), False))
        cells += [""] * len(judged)
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if judged:
        notes.append("Verdicts vs the reference: accuracy drop Pass ≤ {p} pt, Warn ≤ {w} pt; perplexity increase "
                     "Pass ≤ +{rp:.0f}%, Warn ≤ +{rw:.0f}%; mean KL Pass ≤ {kp} nats, Warn ≤ {kw}; else Fail."
                     .format(p=THRESHOLDS["points"]["pass"], w=THRESHOLDS["points"]["warn"],
                             rp=100 * THRESHOLDS["relative"]["pass"], rw=100 * THRESHOLDS["relative"]["warn"],
                             kp=THRESHOLDS["kl"]["pass"], kw=THRESHOLDS["kl"]["warn"]))
    missing = [c["missing"] for c in caps.values() if c["score"] is not None and c["partial"]]
    if missing:
        notes.append("Capability Score is partial: missing " + ", ".join(missing[0]) + ".")
    if sample_data:
        notes.append("† mixq's shipped sample data (a format check, not the benchmark): pass --data-dir "
                     "with the official files for real scores.")
    return "\n".join(lines + ([""] + notes if notes else []))
