"""mixq's exact multiple-choice knapsack against a general MILP solver (HiGHS, through scipy) on the same
instances: Nemotron-Nano-9B-v2-sized allocation problems (56 layers of Mamba / attention / MLP tensors at
their real widths, the 22 formats of `--candidates all`, log-normal per-tensor sensitivities).

Prints seconds per solve, the ratio, and whether mixq's proven optimum is at most HiGHS's answer. Timing lives here, not in
the tests (it moves with the CPU and the thread count).

Usage: python benchmarks/allocate_speed.py [--seeds 3] [--fractions 0.02,0.15,0.3,0.6]
"""

from __future__ import annotations

import argparse
import math
import random
import time

import numpy as np

from mixq.core.formats import Format, applicable, parse_candidates, tensor_bytes
from mixq.core.knapsack import allocate

# Nemotron-Nano-9B-v2 widths (hidden 4480, MLP 15680, Mamba 128 x 80 heads, attention 40 / 8 x 128)
D, MLP, INNER, KV = 4480, 15680, 128 * 80, 8 * 128
SHAPES = {
    "M": {"in_proj": (2 * INNER + 2 * 8 * 128 + 128, D), "out_proj": (D, INNER)},
    "*": {"q_proj": (40 * 128, D), "k_proj": (KV, D), "v_proj": (KV, D), "o_proj": (D, 40 * 128)},
    "-": {"up_proj": (MLP, D), "down_proj": (D, MLP)},
}
PATTERN = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-"


def instance(seed: int) -> dict:
    rng = random.Random(seed)
    fmts = parse_candidates("all")
    items = {}
    for layer, kind in enumerate(PATTERN):
        for name, shape in SHAPES[kind].items():
            s = math.exp(rng.gauss(0, 1.5))
            opts = []
            for f in (f for f in fmts if applicable(shape, f)):  # 15680 is not a multiple of 128
                cost = 0.0 if f == Format("float") else \
                    s * 4.0 ** -f.bits * (f.group_size / 64) ** 0.5 * rng.uniform(0.8, 1.2)
                opts.append((str(f), tensor_bytes(shape, f, "bfloat16"), cost))
            items[f"layers.{layer}.{name}"] = opts
    return items


def milp(items: dict, budget: int) -> tuple[float, float]:
    """HiGHS on the same problem: one binary per (item, option), one choice per item, bytes <= budget."""
    from scipy.optimize import Bounds, LinearConstraint, milp as solve

    names = list(items)
    c, b, rows = [], [], []
    for i, n in enumerate(names):
        for _, nbytes, cost in items[n]:
            c.append(cost)
            b.append(nbytes)
            rows.append(i)
    n_var = len(c)
    choose = np.zeros((len(names), n_var))
    choose[rows, np.arange(n_var)] = 1.0
    cons = [LinearConstraint(choose, 1, 1), LinearConstraint(np.array(b, dtype=float)[None], 0, budget)]
    t0 = time.perf_counter()
    r = solve(np.array(c), constraints=cons, integrality=np.ones(n_var), bounds=Bounds(0, 1),
              options={"mip_rel_gap": 1e-9})
    return time.perf_counter() - t0, float(r.fun) if r.success else math.nan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--fractions", default="0.02,0.15,0.3,0.6")
    args = ap.parse_args()
    print(f"{'seed':>4} {'budget':>7} {'items':>5} {'mixq s':>8} {'HiGHS s':>8} {'x faster':>8} "
          f"{'mixq cost':>12} {'HiGHS cost':>12} {'mixq<=HiGHS':>11}")
    for seed in range(args.seeds):
        items = instance(seed)
        lo = sum(min(o[1] for o in v) for v in items.values())
        hi = sum(max(o[1] for o in v) for v in items.values())
        for frac in map(float, args.fractions.split(",")):
            budget = int(lo + frac * (hi - lo))
            t0 = time.perf_counter()
            r = allocate(items, budget)
            ours = time.perf_counter() - t0
            theirs, cost = milp(items, budget)
            ok = r.total_cost <= cost * (1 + 1e-9) + 1e-15  # HiGHS stops at its own tolerances
            print(f"{seed:>4} {frac:>7.2f} {len(items):>5} {ours:>8.3f} {theirs:>8.3f} {theirs / ours:>8.1f} "
                  f"{r.total_cost:>12.6g} {cost:>12.6g} {str(ok):>11}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
