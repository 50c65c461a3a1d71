"""The result files a model card is made from, read as they are, with a list of what is missing.

What: `gather(model_dir)` reads config.json, convert's mixq/plan.json and mixq/report.json, bench's
mixq/bench.json, eval results (mixq/eval*.json, mixq/eval*/comparison.json, any extra files given) and kv_config.json. Nothing is
computed here beyond picking numbers out of those documents; an absent or unreadable file becomes a line
in `missing` / `problems` that the card prints instead of a number.

Eval results: `mixq eval --output DIR` comparisons (DIR/comparison.json: roles model / baseline / reference,
each with lm-eval's result layout, Capability Score and verdicts) are read through mixq.eval.scores, so
each headline value is the one its table shows (accuracies in percent). Simpler hand-written shapes are accepted too (task -> number or
{score|accuracy|...}, as a dict or a list of {task, score}; `capability_score`; a `baseline` block or
per-task `baseline` numbers). Anything else is reported as unrecognised rather than guessed at.
A result measured on other files than the directory holds now (another fingerprint) is kept but noted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixq.report.bench import BENCH_FORMAT

SCORE_KEYS = ("score", "accuracy", "acc", "pass@1", "pass_at_1", "exact_match", "strict", "value", "mean")
TASK_CONTAINERS = ("tasks", "results", "scores", "benchmarks")
CAPABILITY_KEYS = ("capability_score", "capability", "Capability Score")
NAME_KEYS = ("task", "name", "benchmark")


@dataclass
class Sources:
    dir: Path
    config: dict | None = None
    plan: dict | None = None
    report: dict | None = None
    bench: dict | None = None
    kv: dict | None = None
    evals: list[dict] = field(default_factory=list)  # normalized, each with "file"
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def read_json(path: Path, problems: list[str]) -> Any:
    """The parsed file, or None (with a line in `problems` when it exists but cannot be read)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path.name}: unreadable ({str(e).splitlines()[0]}); left out")
        return None


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _score(v: Any) -> float | None:
    n = _number(v)
    if n is not None:
        return n
    if isinstance(v, dict):
        for k in SCORE_KEYS:
            n = _number(v.get(k))
            if n is not None:
                return n
        if isinstance(v.get("metrics"), dict):
            return _score(v["metrics"])
    return None


# -- `mixq eval` comparisons (`--output DIR` writes DIR/comparison.json): {"tasks": [...], "titles": {...},
#    "roles": {role: {"model": identity, "lm_eval": lm-eval's result layout, "capability", "verdicts"}}} --------
def _headline(name: str, doc: dict, res: dict) -> tuple[float | None, dict]:
    """A task's headline value the way `mixq eval` reports it (percent for accuracies), and its labels."""
    info = {"title": (doc.get("titles") or {}).get(name, name), "metric": None, "higher_is_better": None,
            "n": None, "sample_data": name in (doc.get("sample_data") or [])}
    try:
        from mixq.eval import scores
    except ImportError:  # the eval package is not part of this install: no headline
        return None, info
    h = scores.headline(name, res)
    v = scores.value(res, name)
    info.update(metric=h.label, higher_is_better=h.higher_is_better, n=scores.count(res, name))
    return (None if v is None else v * (100.0 if h.percent else 1.0)), info


def _verdict_text(v: Any) -> str | None:
    if not isinstance(v, dict) or "verdict" not in v:
        return None
    c, rule = v.get("change"), v.get("rule")
    if not isinstance(c, (int, float)):
        return str(v["verdict"])
    detail = f"{-c:+.1f} pt" if rule == "points" else f"{100 * c:+.1f}%" if rule == "relative" else f"KL {c:.3g}"
    return f"{v['verdict']} ({detail})"


def _mixq_role(doc: dict, role: str) -> dict | None:
    entry = doc["roles"].get(role)
    if not isinstance(entry, dict):
        return None
    info, res = entry.get("model") or {}, entry.get("lm_eval") or {}
    cap, verdicts = entry.get("capability") or {}, entry.get("verdicts") or {}
    tasks, meta = {}, {}
    for name in doc.get("tasks") or []:
        v, m = _headline(name, doc, res)
        if v is None:
            continue
        tasks[name] = v
        meta[name] = {**m, "verdict": _verdict_text(verdicts.get(name))}
    return {"model": info.get("name"), "fingerprint": info.get("fingerprint"),
            "capability_score": _number(cap.get("score")), "partial": cap.get("partial"),
            "missing_tasks": cap.get("missing") or [], "capability_verdict": _verdict_text(verdicts.get("capability")),
            "tasks": tasks, "task_info": meta, "disk_bytes": info.get("size_bytes")}


def _from_mixq_eval(doc: dict) -> dict | None:
    main = _mixq_role(doc, "model")
    if main is None or (not main["tasks"] and main["capability_score"] is None):
        return None
    return {**main, "baseline": _mixq_role(doc, "baseline"), "reference": _mixq_role(doc, "reference"),
            "versions": doc.get("versions") if isinstance(doc.get("versions"), dict) else None}


def _tasks(doc: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(task -> score, task -> baseline score given beside it)."""
    tasks, base = {}, {}
    for key in TASK_CONTAINERS:
        c = doc.get(key)
        items: list[tuple[str, Any]] = []
        if isinstance(c, dict):
            items = [(str(k), v) for k, v in c.items()]
        elif isinstance(c, list):
            for it in c:
                if isinstance(it, dict):
                    name = next((it[k] for k in NAME_KEYS if isinstance(it.get(k), str)), None)
                    if name:
                        items.append((name, it))
        for name, v in items:
            if name in CAPABILITY_KEYS:
                continue
            s = _score(v)
            if s is not None:
                tasks.setdefault(name, s)
            if isinstance(v, dict):
                b = _score(v.get("baseline"))
                if b is not None:
                    base.setdefault(name, b)
        if tasks:
            break
    return tasks, base


def _capability(doc: dict) -> float | None:
    for k in CAPABILITY_KEYS:
        s = _score(doc.get(k))
        if s is not None:
            return s
    for key in TASK_CONTAINERS:  # some reports keep it among the tasks
        c = doc.get(key)
        if isinstance(c, dict):
            for k in CAPABILITY_KEYS:
                s = _score(c.get(k))
                if s is not None:
                    return s
    return None


def _name(doc: dict) -> str | None:
    m = doc.get("model")
    if isinstance(m, str):
        return m
    if isinstance(m, dict):
        for k in ("name", "path", "id"):
            if isinstance(m.get(k), str):
                return m[k]
    cfg = doc.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), str):
        return cfg["model"]
    return doc.get("name") if isinstance(doc.get("name"), str) else None


def _disk_bytes(doc: dict) -> int | None:
    for d in (doc, doc.get("model") if isinstance(doc.get("model"), dict) else {}):
        for k in ("disk_bytes", "size_bytes", "size_on_disk_bytes"):
            n = _number(d.get(k))
            if n is not None:
                return int(n)
    return None


def _one(doc: dict) -> dict | None:
    tasks, base_tasks = _tasks(doc)
    cap = _capability(doc)
    if not tasks and cap is None:
        return None
    partial = doc.get("partial") if isinstance(doc.get("partial"), bool) else None
    return {"model": _name(doc), "fingerprint": None, "capability_score": cap, "partial": partial,
            "missing_tasks": [], "capability_verdict": None, "tasks": tasks, "task_info": {},
            "disk_bytes": _disk_bytes(doc), "_baseline_tasks": base_tasks}


def normalize_eval(doc: Any) -> dict | None:
    """{model, fingerprint, capability_score, partial, missing_tasks, tasks, task_info, disk_bytes,
    baseline, reference, versions} (baseline / reference: the same fields, or None), or None."""
    if not isinstance(doc, dict):
        return None
    if isinstance(doc.get("roles"), dict):
        return _from_mixq_eval(doc)
    main = _one(doc)
    if main is None and isinstance(doc.get("model"), dict):
        main = _one(doc["model"])
    if main is None:
        return None
    baseline = None
    b = doc.get("baseline")
    if isinstance(b, dict):
        baseline = _one(b)
        if baseline is not None:
            baseline.pop("_baseline_tasks")
    if baseline is None and main["_baseline_tasks"]:
        name = b if isinstance(b, str) else None
        baseline = {"model": name, "fingerprint": None, "capability_score": _score(doc.get("baseline_capability_score")),
                    "partial": None, "missing_tasks": [], "capability_verdict": None, "tasks": main["_baseline_tasks"],
                    "task_info": {}, "disk_bytes": None}
    main.pop("_baseline_tasks")
    versions = doc.get("versions") if isinstance(doc.get("versions"), dict) else None
    return {**main, "baseline": baseline, "reference": None, "versions": versions}


def eval_files(model_dir: Path) -> list[Path]:
    """mixq/eval*.json and the comparison in each mixq/eval*/ that `mixq eval --output` wrote."""
    return sorted((model_dir / "mixq").glob("eval*.json")) + sorted((model_dir / "mixq").glob("eval*/comparison.json"))


def gather(model_dir: Path, extra_evals: list[str] | None = None) -> Sources:
    s = Sources(dir=model_dir)
    s.config = read_json(model_dir / "config.json", s.problems)
    mixq_dir = model_dir / "mixq"
    s.plan = read_json(mixq_dir / "plan.json", s.problems)
    s.report = read_json(mixq_dir / "report.json", s.problems)
    if s.plan is not None and not (isinstance(s.plan, dict) and isinstance(s.plan.get("tensors"), dict)
                                   and {"achieved_bpw", "target_bpw", "params"} <= s.plan.keys()):
        s.problems.append("mixq/plan.json: not a mixq convert plan; left out")
        s.plan = None
    if s.report is not None and not (isinstance(s.report, dict) and isinstance(s.report.get("comparison"), list)
                                     and "disk_bytes" in s.report):
        s.problems.append("mixq/report.json: not a mixq convert report; left out")
        s.report = None
    if s.plan is None or s.report is None:
        gone = [n for n, d in (("mixq/plan.json", s.plan), ("mixq/report.json", s.report)) if d is None]
        s.missing.append(f"convert results ({', '.join(gone)}): size, bits-per-weight, quality comparison and "
                         "provenance come from `mixq convert`")
    bench = read_json(mixq_dir / "bench.json", s.problems)
    if isinstance(bench, dict) and bench.get("format") == BENCH_FORMAT and bench.get("benchmarks"):
        s.bench = bench
    else:
        if bench is not None:
            s.problems.append("mixq/bench.json: not a mixq bench file (or empty); left out")
        s.missing.append("speed and memory (mixq/bench.json): run `mixq bench MODEL_DIR`")
    kv = read_json(model_dir / "kv_config.json", s.problems)
    if isinstance(kv, dict) and isinstance(kv.get("layers"), list):
        s.kv = kv
    elif kv is not None:
        s.problems.append("kv_config.json: not a mixq kv config; left out")
    else:
        s.missing.append("KV cache config (kv_config.json): optional, made by `mixq kv-cache MODEL_DIR`")
    files = eval_files(model_dir) + [Path(p) for p in (extra_evals or [])]
    seen = set()
    for f in files:
        if f.resolve() in seen:
            continue
        seen.add(f.resolve())
        if not f.is_file():
            s.problems.append(f"{f}: no such eval file; left out")
            continue
        doc = read_json(f, s.problems)
        if doc is None:
            continue
        norm = normalize_eval(doc)
        if norm is None:
            s.problems.append(f"{f.name}: no recognisable benchmark scores; left out")
            continue
        name = str(f.relative_to(model_dir / "mixq")) if f.is_relative_to(model_dir / "mixq") else f.name
        s.evals.append({**norm, "file": name})
    _note_fingerprints(s)
    if not s.evals:
        s.missing.append("benchmark scores and Capability Score (mixq/eval*.json): run "
                         "`mixq eval MODEL_DIR --output MODEL_DIR/mixq/eval`")
    return s


def _note_fingerprints(s: Sources) -> None:
    """Say when eval / bench results were measured on files other than those here now."""
    if not any(s.dir.glob("model*.safetensors")):
        return
    from mixq.core.modelio import fingerprint

    try:
        here = fingerprint(s.dir)
    except (OSError, ValueError):
        return
    for ev in s.evals:
        if ev.get("fingerprint") and ev["fingerprint"] != here:
            s.problems.append(f"{ev['file']}: measured on files with fingerprint {ev['fingerprint'][:12]}, this "
                              f"directory is {here[:12]} (config or weights changed since); shown as recorded")
    for e in (s.bench or {}).get("benchmarks", []):
        fp = (e.get("model") or {}).get("fingerprint")
        if fp and fp != here:
            s.problems.append(f"bench.json: an entry was measured on files with fingerprint {fp[:12]}, this "
                              f"directory is {here[:12]}; shown as recorded")
