"""`mixq inspect MODEL`: the model's anatomy as a table or JSON."""

from __future__ import annotations

import json

from mixq.core import blas
from mixq.core.anatomy import describe
from mixq.core.modelio import load


def add_arguments(p) -> None:
    p.add_argument("model", help="local model directory, hub id, or demo / demo-moe")
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128),
                   help="group size for the width-divisibility rule (default 64)")
    p.add_argument("--tensors", action="store_true", help="also list every tensor")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def run(args) -> int:
    lm = load(args.model, compute_dtype=None, lazy=True)
    anatomy = describe(lm.model, lm.config, group_size=args.group_size)
    if args.json:
        out = {"model": lm.name, "path": str(lm.path), "blas": blas.info(), **anatomy.to_dict()}
        print(json.dumps(out, indent=2))
        return 0
    print(f"model      {lm.name}  ({lm.path})")
    print(f"type       {anatomy.model_type}" + (f"   pattern {anatomy.pattern}" if anatomy.pattern else ""))
    q = anatomy.quantizable_params
    print(f"params     {_fmt_params(anatomy.total_params)} total, {_fmt_params(q)} quantizable "
          f"({100 * q / max(1, anatomy.total_params):.1f}%) at group size {anatomy.group_size}")
    print()
    print(f"{'layer':>5}  {'kind':<10} {'parts':<16} {'cache':>5}  {'cache type':<12} {'tensors':>7} "
          f"{'params':>9} {'quantizable':>11}")
    for l in anatomy.layers:
        slot = "-" if l.cache_slot is None else str(l.cache_slot)
        print(f"{l.index:>5}  {l.kind:<10} {'+'.join(l.parts):<16} {slot:>5}  {l.cache_type or '-':<12} "
              f"{len(l.tensors):>7} {_fmt_params(l.params):>9} {_fmt_params(l.quantizable_params):>11}")
    outside = [t for t in anatomy.tensors if t.layer is None]
    for t in outside:
        print(f"{'':>5}  {t.path:<42} {'':>7} {_fmt_params(t.params):>9} "
              f"{_fmt_params(t.params if t.quantizable else 0):>11}")
    floats = [t for t in anatomy.tensors if not t.quantizable]
    reasons: dict[str, int] = {}
    for t in floats:
        reasons[t.reason] = reasons.get(t.reason, 0) + 1
    print()
    print("kept float: " + ", ".join(f"{r} x{n}" for r, n in sorted(reasons.items())))
    if args.tensors:
        print()
        print(f"{'tensor':<52} {'shape':<18} {'params':>9}  quantizable / why not")
        for t in anatomy.tensors:
            cur = f"  [{t.current['mode']} {t.current['bits']}b g{t.current['group_size']}]" if t.current else ""
            print(f"{t.path:<52} {'x'.join(map(str, t.shape)):<18} {_fmt_params(t.params):>9}  "
                  f"{'yes' if t.quantizable else 'no: ' + t.reason}{cur}")
    return 0
