"""From measured sensitivities to a plan: one format per tensor under an exact bits-per-weight ceiling.

Bits per weight is mlx-lm's definition, computed before anything is written: every array's bytes
(packed weights, scales, biases, float tensors) x 8 / mlx-lm's parameter count. Float tensors keep their
stored dtype, and affine scales/biases take it too, so the plan's byte count is the written model's.
"""

from __future__ import annotations

import math

from mixq.core.anatomy import Anatomy
from mixq.core.errors import MixqError
from mixq.core.formats import Format, applicable, dtype_itemsize, tensor_bytes
from mixq.core.knapsack import Option, allocate

PLAN_FORMAT = "mixq-plan/1"


def candidate_items(anatomy: Anatomy) -> list:
    """Tensors the allocator may choose a format for: everything no hard rule keeps float."""
    return [t for t in anatomy.tensors if not t.float_by_rule and t.current is None]


def fixed_bytes(anatomy: Anatomy, source_dtypes: dict) -> int:
    """Bytes of every array the allocator does not choose for (norms, conv1d, biases, router, ...)."""
    items = {t.path for t in candidate_items(anatomy)}
    return sum(t.params * dtype_itemsize(source_dtypes.get(t.path, t.dtype))
               for t in anatomy.tensors if t.path not in items)


def plan_bytes(anatomy: Anatomy, source_dtypes: dict, formats: dict[str, Format]) -> int:
    """Total bytes of the model when each item tensor is stored in `formats[path]` (default float)."""
    total = fixed_bytes(anatomy, source_dtypes)
    for t in candidate_items(anatomy):
        total += tensor_bytes(t.shape, formats.get(t.path, Format("float")), source_dtypes.get(t.path, t.dtype))
    return total


def make_plan(anatomy: Anatomy, sensitivity: dict, candidates: list[Format], target_bpw: float,
              source_dtypes: dict) -> dict:
    """The cheapest-KL choice of formats whose total size is at most `target_bpw` (exact knapsack)."""
    params = anatomy.mlx_lm_params
    budget = math.floor(target_bpw * params / 8)
    fixed = fixed_bytes(anatomy, source_dtypes)
    items, by_path = {}, {}
    for t in candidate_items(anatomy):
        src = source_dtypes.get(t.path, t.dtype)
        costs = sensitivity["tensors"][t.path]["costs"]
        opts = []
        for f in candidates:
            if applicable(t.shape, f) and str(f) in costs:
                opts.append(Option(str(f), tensor_bytes(t.shape, f, src), float(costs[str(f)])))
        if not any(o.name == "float" for o in opts):  # float always fits the format set's semantics
            opts.append(Option("float", tensor_bytes(t.shape, Format("float"), src), 0.0))
        items[t.path] = opts
        by_path[t.path] = t
    try:
        alloc = allocate(items, budget, fixed_bytes=fixed)
    except MixqError:
        smallest = fixed + sum(min(o.bytes for o in opts) for opts in items.values())
        raise MixqError(f"target {target_bpw} bpw is infeasible with these candidates: the smallest plan is "
                        f"{smallest * 8 / params:.4f} bpw") from None
    tensors = {}
    for path, name in alloc.choices.items():
        t = by_path[path]
        tensors[path] = {
            "module": t.module, "layer": t.layer, "shape": t.shape, "format": name,
            "bytes": alloc.picked[path].bytes, "sensitivity": sensitivity["tensors"][path]["costs"],
        }
    return {
        "format": PLAN_FORMAT,
        "target_bpw": target_bpw,
        "achieved_bpw": alloc.total_bytes * 8 / params,
        "total_bytes": alloc.total_bytes,
        "fixed_bytes": fixed,
        "params": params,
        "predicted_kl": alloc.total_cost,
        "allocation": {"lower_bound": alloc.lower_bound, "gap": alloc.gap, "exact": alloc.exact,
                       "lagrange_multiplier": alloc.lagrange_multiplier,
                       # timings stay out: plan.json is byte-identical for the same inputs
                       **{k: v for k, v in alloc.stats.items() if k != "seconds"}},
        "tensors": tensors,
    }


def plan_formats(plan: dict) -> dict[str, Format]:
    return {p: Format.parse(e["format"]) for p, e in plan["tensors"].items()}


def uniform_formats(anatomy: Anatomy, fmt: Format) -> tuple[dict[str, Format], list[str]]:
    """Every item in `fmt`; returns the formats and the tensors that had to stay float (width rule)."""
    out, fell_back = {}, []
    for t in candidate_items(anatomy):
        if applicable(t.shape, fmt):
            out[t.path] = fmt
        else:
            out[t.path] = Format("float")
            fell_back.append(t.path)
    return out, fell_back


def recipe_formats(anatomy: Anatomy, model, recipe: str, group_size: int = 64) -> dict[str, Format]:
    """mlx-lm's own mixed recipes (e.g. mixed_4_6), evaluated on our items, for comparison."""
    from mlx_lm.convert import mixed_quant_predicate_builder

    pred = mixed_quant_predicate_builder(recipe=recipe, model=model, group_size=group_size)
    modules = dict(model.named_modules())
    out = {}
    for t in candidate_items(anatomy):
        r = pred(t.module, modules[t.module])
        if isinstance(r, dict):
            out[t.path] = Format(r.get("mode", "affine"), r["bits"], r["group_size"])
        else:
            # the recipe quantizes everything else at its low setting (mlx_lm.convert passes bits=low)
            low = 4 if recipe == "mixed_4_6" else int(recipe.split("_")[1])
            f = Format("affine", low, group_size) if r else Format("float")
            out[t.path] = f if applicable(t.shape, f) else Format("float")
    return out
