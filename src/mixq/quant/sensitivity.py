"""Sensitivity: for every quantizable tensor and candidate format, the KL divergence of the model's
next-token distribution from the float model's with only that tensor rounded (as it will be written).

Two methods, both fed by the same calibration sweeps (`mixq.quant.calibpass`):

  estimate (default)  the Fisher estimate of every pair (`mixq.quant.estimate`) from one backward sweep,
                      then a stated subset of pairs measured exactly (the deepest instance of every
                      tensor kind at the formats around the target) calibrates it per kind:
                      est_kind = c_kind x est (est: the Fisher form plus, in MoE models, the
                      expected KL of routing flips, `mixq.quant.flips`). The head role is estimated the same way (its Fisher
                      diagonal and input Gram) and calibrated by its exact KL at the formats nearest
                      the target.
  exact               every pair measured: the tensor rounded, the blocks from its own on re-run for every
                      calibration window (one sweep per block, all its pairs as streams side by side).

Costs are counted in block-forward equivalents (one block's forward over one batch of windows; a backward
counts as two forwards; a head projection counts as head parameters / mean block parameters).
Results stream to a partial file after every tensor, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from mixq.core.errors import MixqError

FORMAT = "mixq-sensitivity/1"
METHODS = {"estimate": "estimate-kfac-v6", "exact": "kl-exact-v4"}


def _round(x: float) -> float:
    # 6 significant digits: run-to-run float noise never reaches plan.json
    return float(f"{x:.6g}")


class Partial:
    """Append-only JSON-lines store of finished records, tied to the settings key."""

    def __init__(self, path: Path | None, key: dict):
        self.path, self.key, self.done = path, key, {}
        if path is None:
            return
        if path.is_file():
            lines = path.read_text().splitlines()
            try:
                head = json.loads(lines[0]) if lines else None
                if head == {"key": key}:
                    for line in lines[1:]:
                        rec = json.loads(line)
                        self.done[rec["id"]] = rec
            except (json.JSONDecodeError, KeyError):
                self.done = {}  # a torn last line or foreign file: start over
        if not self.done:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"key": key}, sort_keys=True) + "\n")

    def add(self, rec: dict) -> None:
        self.done[rec["id"]] = rec
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())


def kind_of(path: str, module_type: str) -> str:
    """Tensor kind for calibration: the module's own name (q_proj, in_proj, fc1, embeddings, lm_head...),
    with shared experts apart from routed ones."""
    parts = path.split(".")
    name = parts[-2] if len(parts) >= 2 else path
    if "shared_experts" in parts:
        return f"shared_experts.{name}"
    return name


def fit_calibration(points: list, kinds: dict, prior: float = 1.0) -> dict:
    """Per kind, c = exp(mean log(exact / estimate)) shrunk toward 1 by `prior` pseudo-points; kinds
    without points take the pooled factor. `points`: (path, fmt, estimate, exact). Also reports how
    well each kind's factor predicts its own points left out one at a time."""
    by_kind: dict = {}
    for path, fmt, est, ex in points:
        if est > 0 and ex > 0:
            by_kind.setdefault(kinds[path], []).append((path, fmt, math.log(ex / est)))
    pooled = [lr for v in by_kind.values() for _, _, lr in v]
    pooled_c = math.exp(sum(pooled) / (len(pooled) + prior)) if pooled else 1.0
    out = {"pooled": {"c": _round(pooled_c), "n": len(pooled)}, "kinds": {}}
    for k in sorted(set(kinds.values())):
        v = by_kind.get(k, [])
        if not v:
            out["kinds"][k] = {"c": _round(pooled_c), "n": 0, "source": "pooled"}
            continue
        lrs = [lr for _, _, lr in v]
        c = math.exp(sum(lrs) / (len(lrs) + prior))
        loo = []
        for j in range(len(lrs)):
            rest = lrs[:j] + lrs[j + 1:]
            cj = sum(rest) / (len(rest) + prior)
            loo.append(abs(lrs[j] - cj))
        out["kinds"][k] = {"c": _round(c), "n": len(lrs), "source": "fit",
                           "raw_log_ratio": _round(sum(lrs) / len(lrs)),
                           "loo_abs_log_error": _round(sum(loo) / len(loo))}
    return out


def load_sensitivity(path: str | os.PathLike, key: dict) -> dict:
    """A saved sensitivity.json, refused unless it was measured with exactly these settings."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise MixqError(f"{p}: no such sensitivity file") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MixqError(f"{p}: not a valid sensitivity file ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise MixqError(f"{p}: not a mixq sensitivity file")
    if doc.get("key") != key:
        theirs = doc.get("key") or {}
        diff = sorted(k for k in set(key) | set(theirs) if key.get(k) != theirs.get(k))
        raise MixqError(f"{p}: measured with different settings ({', '.join(diff)}); re-measure or match them")
    return doc
