"""Results in lm-eval's layout, and where they are written.

Each role's results are lm-eval's `simple_evaluate` output (`results` with `<metric>,<filter>` and
`<metric>_stderr,<filter>`, `groups`, `group_subtasks`, `configs`, `versions`, `n-shot`,
`higher_is_better`, `n-samples`, `config`, per-sample `samples`); mixq's own tasks are added in the same
layout. `--output DIR` writes, as lm-eval's `--output_path` does, `DIR/<role>/results_<time>.json` and
`DIR/<role>/samples_<task>_<time>.jsonl`, plus mixq's comparison (`DIR/comparison.json`, `DIR/table.md`).
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

from mixq.eval import scores

TITLES = {"mmlu": "MMLU", "gsm8k_cot": "GSM8K CoT", "gsm8k": "GSM8K", "ifeval": "IFEval", "humaneval": "HumanEval",
          "humaneval_instruct": "HumanEval (instruct)", "hashhop": "HashHop", "wikitext": "WikiText-2",
          "ja_leaderboard_jcommonsenseqa": "JCommonsenseQA", "bfcl": "BFCL v3 simple", "kl": "KL vs reference"}


def add_native(res: dict, task, rec: dict) -> None:
    """One of mixq's own tasks' results added to a role's lm-eval result dict."""
    name = task.name
    per = [task.per_sample(r) for r in rec["samples"]]
    entry: dict = {"alias": task.title, "sample_len": rec["n"]}
    for k, v in rec["metrics"].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            entry[f"{k},none"] = v
    for metric in (per[0] if per else {}):
        vals = [p[metric] for p in per]
        se = (scores.ratio_stderr(vals, "kl") if isinstance(vals[0], list) else scores.mean_se(vals))
        entry[f"{metric}_stderr,none"] = "N/A" if se is None else se
    res.setdefault("results", {})[name] = entry
    res.setdefault("configs", {})[name] = {"task": name, "source": "mixq", "settings": rec["settings"],
                                          "data": rec["data"]}
    res.setdefault("versions", {})[name] = f"mixq-{task.version}"
    res.setdefault("n-shot", {})[name] = 0
    res.setdefault("higher_is_better", {})[name] = {task.metric: task.higher_is_better}
    res.setdefault("n-samples", {})[name] = {"original": rec["data"]["available"], "effective": rec["n"]}
    res.setdefault("samples", {})[name] = [
        {"doc_id": r["id"], "filter": "none", **p, "record": r} for r, p in zip(rec["samples"], per)]


def _title(t: str, res: dict) -> str:
    shots = (res.get("n-shot") or {}).get(t)
    if shots is None:
        subs = (res.get("group_subtasks") or {}).get(t) or []
        shots = next(((res.get("n-shot") or {}).get(s) for s in subs if (res.get("n-shot") or {}).get(s)), None)
    return TITLES.get(t, t) + (f" ({shots}-shot)" if shots else "")


def document(opts, names: list[str], roles: dict, plan, native_data: dict) -> dict:
    from mixq.eval.runner import role_specs

    sample, notes = [], []
    if plan is not None:
        td = plan.taskdir
        for t in names:
            paths = {p for leaf, p in td.leaves.items() if leaf == t or leaf.startswith(t + "_")}
            if any(td.datasets[p].sample for p in paths if p in td.datasets):
                sample.append(t)
        for group, (have, total) in td.coverage.items():
            if group in names and have < total:
                notes.append(f"{group}: {have} of its {total} subtasks have data in "
                             f"{opts.data_dir or 'the shipped samples'}.")
        notes += plan.notes + td.notes
    sample += [n for n, d in native_data.items() if d.sample_data]
    first = next(iter(roles.values()))["lm_eval"] if roles else {}
    return {"tasks": names, "titles": {t: _title(t, first) for t in names}, "roles": roles,
            "specs": role_specs(opts), "data": (plan.to_dict() if plan else {}) | {
                "mixq_tasks": {n: d.to_dict() for n, d in native_data.items()}},
            "sample_data": sample, "notes": notes, "versions": versions()}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("mixq", "mlx", "mlx-lm", "lm-eval"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover
            out[pkg] = None
    return out


def finite(obj):
    """JSON has no Infinity / NaN: such a value is written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj, **kw) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(finite(json.loads(json.dumps(obj, default=handle_non_serializable))), ensure_ascii=False, **kw)


def public(doc: dict) -> dict:
    """The comparison without per-sample records (those go to the samples files)."""
    out = dict(doc)
    out["roles"] = {r: {**e, "lm_eval": {k: v for k, v in e["lm_eval"].items() if k != "samples"}}
                    for r, e in doc["roles"].items()}
    return out


def write(doc: dict, output: str) -> Path:
    root = Path(output).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y-%m-%dT%H-%M-%S.%f")
    for role, entry in doc["roles"].items():
        d = root / role
        d.mkdir(exist_ok=True)
        res = dict(entry["lm_eval"])
        samples = res.pop("samples", {}) or {}
        res["model_identity"] = entry["model"]
        (d / f"results_{stamp}.json").write_text(dumps(res, indent=2) + "\n", encoding="utf-8")
        for task, recs in samples.items():
            with open(d / f"samples_{task}_{stamp}.jsonl", "w", encoding="utf-8") as f:
                for r in recs:
                    f.write(dumps(r) + "\n")
    (root / "comparison.json").write_text(dumps(public(doc), indent=1) + "\n", encoding="utf-8")
    (root / "table.md").write_text(doc["table"] + "\n", encoding="utf-8")
    return root
