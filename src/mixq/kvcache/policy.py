"""Bits for every attention layer's keys and values under a target average, in bytes, exactly.

Items are the (layer, K) and (layer, V) parts; each has one option per candidate bit width with its
bytes per token (heads and head_dim differ between layers, and K and V may differ) and its measured KL.
Minimise the summed KL with total bytes per token <= target_bits / 8 x elements per token (the target
is a ceiling). This multiple-choice knapsack is small (<= a few hundred items x a few options), so it is
solved exactly by dynamic programming over byte totals, in units of the gcd of all option sizes.

Measured KLs are means over positions and carry noise (a few spiky positions can dominate), so a
narrower width can measure cheaper than a wider one. The allocator never believes that: a width costs at
least what any wider candidate measured (a running max from wide to narrow). The raw measurements are
kept in the config; `predicted_kl` is the sum of the costs used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mixq.core.errors import MixqError
from mixq.kvcache.cache import FLOAT_BITS, part_bytes_per_token

MAX_STATES = 20_000_000  # byte-units x items the DP may touch


@dataclass(frozen=True)
class Option:
    label: int      # bit width
    nbytes: int     # bytes per token
    cost: float     # measured KL


def solve(items: list[tuple[str, list[Option]]], budget: int) -> dict:
    """Exact min-cost choice of one option per item with total bytes <= budget.

    Returns {"choices": {item: Option}, "bytes", "cost"}. Ties: the larger total wins (bytes under the
    ceiling buy safety against measurement noise), then the option listed first. Raises MixqError when even the smallest options do not fit.
    """
    if not items:
        return {"choices": {}, "bytes": 0, "cost": 0.0}
    for name, opts in items:
        if not opts:
            raise MixqError(f"{name}: no candidate option")
        for o in opts:
            if o.nbytes < 0 or math.isnan(o.cost):
                raise MixqError(f"{name}: bad option {o}")
    smallest = sum(min(o.nbytes for o in opts) for _, opts in items)
    if smallest > budget:
        raise MixqError(f"target too low: the smallest candidates need {smallest} bytes per token, "
                        f"the target allows {budget}")
    unit = 0
    for _, opts in items:
        for o in opts:
            unit = math.gcd(unit, o.nbytes)
    unit = unit or 1
    cap = budget // unit
    largest = sum(max(o.nbytes for o in opts) for _, opts in items) // unit
    cap = min(cap, largest)
    if (cap + 1) * len(items) > MAX_STATES:
        raise MixqError(f"allocation too large for the exact solver ({cap + 1} byte units x {len(items)} items)")

    dp = np.full(cap + 1, np.inf)
    dp[0] = 0.0
    picks = []
    for _, opts in items:
        new = np.full(cap + 1, np.inf)
        arg = np.full(cap + 1, -1, dtype=np.int16)
        for j, o in enumerate(opts):
            w = o.nbytes // unit
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = dp[: cap + 1 - w] + o.cost
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp = new
        picks.append(arg)
    best = float(dp.min())
    total = int(np.flatnonzero(dp == best)[-1])  # the largest total among the cheapest
    choices, used = {}, total
    for (name, opts), arg in zip(reversed(items), reversed(picks)):
        o = opts[int(arg[used])]
        choices[name] = o
        used -= o.nbytes // unit
    assert used == 0
    choices = {name: choices[name] for name, _ in items}
    return {"choices": choices, "bytes": sum(o.nbytes for o in choices.values()),
            "cost": float(sum(o.cost for o in choices.values()))}


def allocate(layers: list[dict], candidates: list[int], target_bits: float, *, group_size: int,
             scale_bits: int = 16) -> dict:
    """Bits per layer part. `layers`: entries with layer, k_shape, v_shape and sensitivity
    {"k": {bits: kl}, "v": {...}} (bits as str or int; 16 = float costs 0 when not measured).

    Returns {"bits": {layer: (k_bits, v_bits)}, "budget_bytes", "bytes_per_token", "elements_per_token",
    "achieved_bits", "target_bits", "predicted_kl", "exact": True}.
    """
    if not candidates:
        raise MixqError("no candidate bit widths")
    if not (isinstance(target_bits, (int, float)) and math.isfinite(target_bits) and target_bits > 0):
        raise MixqError(f"target bits must be a positive number, got {target_bits!r}")
    items = []
    elements = 0
    for e in layers:
        for part in ("k", "v"):
            heads, dim = e[f"{part}_shape"]
            elements += heads * dim
            sens = {int(b): float(v) for b, v in e.get("sensitivity", {}).get(part, {}).items()}
            opts, floor = [], 0.0
            for b in sorted(set(candidates), reverse=True):  # wide to narrow: costs never decrease
                if b == FLOAT_BITS:
                    cost = sens.get(b, 0.0)
                elif b in sens:
                    cost = sens[b]
                else:
                    raise MixqError(f"layer {e['layer']} {part.upper()}: no measured sensitivity at {b} bits")
                floor = max(floor, cost)
                opts.append(Option(b, part_bytes_per_token(heads, dim, b, group_size, scale_bits), floor))
            items.append((f"{e['layer']}.{part}", opts[::-1]))
    budget = int(math.floor(target_bits * elements / 8 + 1e-9))
    try:
        sol = solve(items, budget)
    except MixqError as err:
        if str(err).startswith("target too low"):
            low = min(candidates)
            need = sum(min(o.nbytes for o in opts) for _, opts in items)
            raise MixqError(f"target {target_bits} bits is below what the smallest candidate ({low}-bit) needs: "
                            f"{8 * need / elements:.3f} average bits with scales") from err
        raise
    bits = {}
    for e in layers:
        bits[e["layer"]] = (sol["choices"][f"{e['layer']}.k"].label, sol["choices"][f"{e['layer']}.v"].label)
    return {
        "bits": bits,
        "target_bits": float(target_bits),
        "budget_bytes": budget,
        "bytes_per_token": sol["bytes"],
        "elements_per_token": elements,
        "achieved_bits": round(8 * sol["bytes"] / elements, 6),
        "predicted_kl": sol["cost"],
        "exact": True,
    }


def uniform(layers: list[dict], k_bits: int, v_bits: int | None = None) -> dict:
    """The same bits everywhere: {layer: (k_bits, v_bits)}."""
    v_bits = k_bits if v_bits is None else v_bits
    return {e["layer"]: (k_bits, v_bits) for e in layers}
