"""The comparison: Capability Score, degradation verdicts against the float reference, the markdown table.

A verdict judges a quant's headline against the reference's on the same items:

* accuracy-type scores (percent): the drop in points, Pass below 2.0, Warn up to 5.0, else Fail;
* perplexity (lower is better): the relative increase, Pass up to +10 %, Warn up to +25 %, else Fail;
* KL(reference || quant), mean over held-out tokens: Pass up to 0.05 nats, Warn up to 0.15, else Fail.

These reproduce the model cards mixq imitates (WikiText-2 +7.0 % Pass, JCommonsenseQA -4.2 pt Warn) and
are configurable (`--thresholds points=2:5,relative=0.10:0.25,kl=0.05:0.15`). Every change carries its
standard error (paired over the items both models answered; else the two standard errors combined), and a
Warn or Fail is given only when the change exceeds two standard errors; otherwise the verdict is
"within noise (n = ...)". The Capability Score is the unweighted mean (in percent) of the six headline
scores in `scores.CAPABILITY`, its standard error that of a mean of independent tasks.
"""

from __future__ import annotations

import math

from mixq.core.errors import MixqError
from mixq.eval import scores

THRESHOLDS = {
    "points": {"pass": 2.0, "warn": 5.0, "unit": "percentage points dropped vs reference"},
    "relative": {"pass": 0.10, "warn": 0.25, "unit": "relative increase vs reference"},
    "kl": {"pass": 0.05, "warn": 0.15, "unit": "mean KL(reference || quant), nats/token"},
}
NOISE_SE = 2.0


def parse_thresholds(spec: str | None) -> dict:
    """"points=2:5,relative=0.1:0.25" -> THRESHOLDS with those replaced."""
    out = {k: dict(v) for k, v in THRESHOLDS.items()}
    for part in (p.strip() for p in (spec or "").split(",") if p.strip()):
        rule, _, vals = part.partition("=")
        try:
            p, w = (float(x.rstrip("%")) / (100 if x.endswith("%") else 1) for x in vals.split(":"))
        except ValueError:
            raise MixqError(f"--thresholds {part!r}: expected RULE=PASS:WARN (rules: {', '.join(THRESHOLDS)})") from None
        if rule not in out or not 0 <= p <= w:
            raise MixqError(f"--thresholds {part!r}: expected RULE=PASS:WARN with 0 <= PASS <= WARN "
                            f"(rules: {', '.join(THRESHOLDS)})")
        out[rule]["pass"], out[rule]["warn"] = p, w
    return out


def grade(change: float, se: float | None, n: int | None, rule: str, thresholds: dict | None = None) -> dict:
    """A verdict for a degradation `change` (points dropped, relative increase or KL; larger is worse)."""
    t = (thresholds or THRESHOLDS)[rule]
    out = {"change": change, "stderr": se, "n": n, "rule": rule}
    if change <= t["pass"]:
        return out | {"verdict": "Pass"}
    if se is None or change <= NOISE_SE * se:
        return out | {"verdict": "within noise", "wanted": "Warn" if change <= t["warn"] else "Fail"}
    return out | {"verdict": "Warn" if change <= t["warn"] else "Fail"}


def _degradation(h: scores.Headline, v: float, ref: float | None) -> float | None:
    """Larger is worse, in the rule's unit."""
    if h.rule == "kl":
        return v
    if ref is None:
        return None
    if h.rule == "relative":
        if ref <= 0:
            return None
        return v / ref - 1.0 if not h.higher_is_better else 1.0 - v / ref
    scale = 100.0 if h.percent else 1.0
    return scale * ((ref - v) if h.higher_is_better else (v - ref))


def verdict(task: str, res: dict, ref: dict | None, thresholds: dict | None = None) -> dict | None:
    h = scores.headline(task, res)
    v = scores.value(res, task)
    if v is None or (h.rule != "kl" and (ref is None or scores.value(ref, task) is None)):
        return None
    r = None if h.rule == "kl" else scores.value(ref, task)
    change = _degradation(h, v, r)
    if change is None:
        return None
    if h.rule == "kl":
        se, n = scores.stderr(res, task), scores.count(res, task)
    else:
        se, n = scores.paired_change_se(scores.samples(res, task, h.key), scores.samples(ref, task, h.key), h)
        if se is None:  # nothing to pair: the two standard errors combined
            sa, sb = scores.stderr(res, task), scores.stderr(ref, task)
            scale = (100.0 if h.percent else 1.0) if h.rule == "points" else (1.0 / r if r else 0.0)
            se = math.hypot(sa, sb) * scale if sa is not None and sb is not None else None
            n = scores.count(res, task)
    return grade(change, se, n, h.rule, thresholds)


def capability(res: dict, tasks: list[str]) -> dict:
    present = {t: scores.value(res, t) for t in scores.CAPABILITY if t in tasks}
    present = {t: 100.0 * v for t, v in present.items() if v is not None}
    missing = [t for t in scores.CAPABILITY if t not in present]
    ses = [scores.stderr(res, t) for t in present]
    se = math.sqrt(sum(s * s for s in ses)) * 100.0 / len(present) if present and None not in ses else None
    return {"score": sum(present.values()) / len(present) if present else None, "stderr": se,
            "partial": bool(missing), "present": sorted(present), "missing": missing}


def capability_verdict(doc_roles: dict, role: str, tasks: list[str], thresholds: dict | None) -> dict | None:
    cap, ref = doc_roles[role]["capability"], doc_roles.get("reference", {}).get("capability")
    if not ref or cap["score"] is None or ref["score"] is None or cap["present"] != ref["present"]:
        return None
    vs = [doc_roles[role]["verdicts"].get(t) for t in cap["present"]]
    se = math.sqrt(sum(v["stderr"] ** 2 for v in vs)) / len(vs) if all(v and v["stderr"] is not None
                                                                    for v in vs) else None
    return grade(ref["score"] - cap["score"], se, None, "points", thresholds)


def summarize(doc: dict, thresholds: dict | None = None) -> None:
    """Fill each role's capability and verdicts (vs the reference) into doc["roles"]."""
    roles, tasks = doc["roles"], doc["tasks"]
    ref = roles.get("reference", {}).get("lm_eval")
    for role, r in roles.items():
        r["capability"] = capability(r["lm_eval"], tasks)
        r["verdicts"] = {}
        if role == "reference":
            continue
        for t in tasks:
            v = verdict(t, r["lm_eval"], ref, thresholds)
            if v:
                r["verdicts"][t] = v
    for role in roles:
        if role != "reference":
            v = capability_verdict(roles, role, tasks, thresholds)
            if v:
                roles[role]["verdicts"]["capability"] = v


# ------------------------------------------------------------------------------------------------ table

def _fmt(v: float | None, percent: bool) -> str:
    if v is None:
        return "—"
    if percent:
        return f"{100 * v:.1f}"
    a = abs(v)
    return f"{v:.4f}" if a < 1 else f"{v:.3f}" if a < 100 else f"{v:.1f}"


def _cell(v: float | None, se: float | None, percent: bool) -> str:
    if v is None:
        return "—"
    return _fmt(v, percent) + ("" if se is None else f" ± {_fmt(se, percent)}")


def _verdict_cell(v: dict | None) -> str:
    if not v:
        return "—"
    c = v["change"]
    detail = f"{-c:+.1f} pt" if v["rule"] == "points" else f"{100 * c:+.1f} %" if v["rule"] == "relative" \
        else f"KL {c:.3g}"
    if v["verdict"] == "within noise":
        n = f"n = {v['n']}" if v.get("n") else "no stderr"
        return f"within noise ({detail}, {n})"
    return f"{v['verdict']} ({detail})"


def _rows(doc: dict, task: str, roles: list[str], judged: list[str]) -> list[list[str]]:
    res = {r: doc["roles"][r]["lm_eval"] for r in roles}
    some = next(iter(res.values()))
    h = scores.headline(task, some)
    arrow = "↑" if h.higher_is_better else "↓"
    title = doc.get("titles", {}).get(task, task) + (" †" if task in doc.get("sample_data", []) else "")
    n = scores.count(some, task)
    cells = [title, f"{h.label} {arrow}", str(n or "—")]
    cells += [_cell(scores.value(res[r], task), scores.stderr(res[r], task), h.percent) for r in roles]
    rows = [cells + [_verdict_cell(doc["roles"][r]["verdicts"].get(task)) for r in judged]]
    for key, label, percent in scores.EXTRAS.get(task, ()):
        vals = [scores.value(res[r], task, key) for r in roles]
        if any(v is not None for v in vals):
            rows.append(["", label, ""] + [_fmt(v, percent) for v in vals] + [""] * len(judged))
    if task == "hashhop":
        for sub in (some.get("group_subtasks") or {}).get("hashhop", []):
            vals = [scores.value(res[r], sub, "acc,none") for r in roles]
            alias = ((some.get("results") or {}).get(sub) or {}).get("alias", sub)
            rows.append(["", f"{alias} %", str(scores.count(some, sub) or "")]
                        + [_cell(v, scores.stderr(res[r], sub), True) for v, r in zip(vals, roles)]
                        + [""] * len(judged))
    return rows


def markdown(doc: dict) -> str:
    roles = [r for r in ("reference", "baseline", "model") if r in doc["roles"]]
    judged = [r for r in ("baseline", "model") if r in roles and any(doc["roles"][r]["verdicts"].values())]
    head = ["benchmark", "metric", "n"] + roles + [f"verdict: {r}" for r in judged]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for t in doc["tasks"]:
        if any(scores.value(doc["roles"][r]["lm_eval"], t) is not None for r in roles):
            lines += ["| " + " | ".join(c) + " |" for c in _rows(doc, t, roles, judged)]
    caps = {r: doc["roles"][r]["capability"] for r in roles}
    some = next((c for c in caps.values() if c["score"] is not None), None)
    if some and not (doc.get("capability") or not some["partial"]):
        some = None  # a few of the six among other tasks: no score to speak of
    if some:
        label = "**Capability Score**" + (f" (partial: {len(some['present'])}/{len(scores.CAPABILITY)})"
                                          if some["partial"] else "")
        cells = [label, "mean of " + ", ".join(some["present"]), ""]
        cells += [_cell(None if caps[r]["score"] is None else caps[r]["score"] / 100,
                        None if caps[r]["stderr"] is None else caps[r]["stderr"] / 100, True) for r in roles]
        cells += [_verdict_cell(doc["roles"][r]["verdicts"].get("capability")) for r in judged]
        lines.append("| " + " | ".join(cells) + " |")
    sizes = [doc["roles"][r]["model"].get("size_bytes") for r in roles]
    if any(sizes):
        lines.append("| " + " | ".join(["size on disk", "MB", ""] + [f"{s / 1e6:.2f}" if s else "—" for s in sizes]
                                       + [""] * len(judged)) + " |")
    return "\n".join(lines + _notes(doc, judged, some))


def _notes(doc: dict, judged: list[str], cap: dict | None) -> list[str]:
    t = doc.get("thresholds") or THRESHOLDS
    notes = ["Values ± standard error; n = items per model (lm-eval's limit applies per subtask)."]
    if judged:
        notes.append(
            "Verdicts vs the reference: accuracy drop Pass ≤ {p} pt, Warn ≤ {w} pt; perplexity increase Pass ≤ "
            "+{rp:g} %, Warn ≤ +{rw:g} %; mean KL Pass ≤ {kp} nats, Warn ≤ {kw}; else Fail. A Warn or Fail needs "
            "a change beyond two standard errors, else \"within noise\".".format(
                p=t["points"]["pass"], w=t["points"]["warn"], rp=100 * t["relative"]["pass"],
                rw=100 * t["relative"]["warn"], kp=t["kl"]["pass"], kw=t["kl"]["warn"]))
    if cap and cap["partial"]:
        notes.append("Capability Score is partial: missing " + ", ".join(cap["missing"]) + ".")
    if doc.get("sample_data"):
        notes.append("† mixq's shipped sample data (a format check, not the benchmark): pass --data-dir with the "
                     "official files for real scores.")
    notes += doc.get("notes", [])
    return [""] + notes
