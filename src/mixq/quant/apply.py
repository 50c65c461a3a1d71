"""Verification of a written model: `verify` reloads it with stock `mlx_lm.load` (lazily: no weight is
read) and checks every planned module's format, the total bytes and the bits per weight against the plan.
"""

from __future__ import annotations

import json
from pathlib import Path

from mixq.core.errors import MixqError
from mixq.core.formats import Format


def verify(out_dir: Path, plan: dict) -> dict:
    """Reload with stock mlx_lm.load; every planned module and the bpw must match. Raises MixqError."""
    import mlx.core as mx
    from mlx_lm import load as lm_load
    from mlx_lm.utils import compute_bits_per_weight

    try:
        model, _ = lm_load(path_or_hf_repo=str(out_dir), lazy=True)
    except Exception as e:
        raise MixqError(f"verification failed: mlx_lm.load cannot read {out_dir}: {e}") from e
    modules = dict(model.named_modules())
    problems = []
    for path, e in plan["tensors"].items():
        fmt = Format.parse(e["format"])
        m = modules.get(e["module"])
        if m is None:
            problems.append(f"{e['module']}: missing")
            continue
        got = Format(getattr(m, "mode", "affine"), m.bits, m.group_size) if hasattr(m, "bits") else Format("float")
        if got != fmt:
            problems.append(f"{e['module']}: planned {fmt}, loaded {got}")
    from mlx.utils import tree_flatten

    total_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    bpw = compute_bits_per_weight(model)
    if total_bytes != plan["total_bytes"]:
        problems.append(f"model bytes {total_bytes} != planned {plan['total_bytes']}")
    if abs(bpw - plan["achieved_bpw"]) > 1e-9 * plan["achieved_bpw"]:
        problems.append(f"bpw {bpw:.6f} != planned {plan['achieved_bpw']:.6f}")
    if bpw > plan["target_bpw"] + 1e-12:
        problems.append(f"bpw {bpw:.6f} above the target {plan['target_bpw']}")
    if problems:
        shown = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
        raise MixqError(f"verification failed for {out_dir}: {shown}")
    del model
    mx.clear_cache()
    return {"ok": True, "bpw": bpw, "total_bytes": total_bytes, "modules_checked": len(plan["tensors"])}


def load_plan(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MixqError(f"{path}: cannot read plan ({e})") from e
