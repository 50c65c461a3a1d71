"""Bits for every attention layer's keys and values under a target average, in bytes, exactly.

Items are the (layer, K) and (layer, V) parts; each has one option per candidate bit width with its
bytes per token (heads and head_dim differ between layers, and K and V may differ) and its measured KL.
Minimise the summed KL with total bytes per token <= target_bits / 8 x elements per token (the target
is a ceiling). This multiple-choice knapsack is the weights' one: solved exactly by `mixq.core.knapsack`,
spending what the budget leaves on options that cost no more (bytes under the ceiling buy safety against
measurement noise).

Measured KLs are means over positions and carry noise (a few spiky positions can dominate), so a
narrower width can measure cheaper than a wider one. The allocator never believes that: a width costs at
least what any wider candidate measured (a running max from wide to narrow). The raw measurements are
kept in the config; `predicted_kl` is the sum of the costs used.
"""

from __future__ import annotations

import math

from mixq.core.errors import MixqError
from mixq.core.knapsack import Option, allocate as knapsack
from mixq.kvcache.cache import FLOAT_BITS, part_bytes_per_token


def allocate(layers: list[dict], candidates: list[int], target_bits: float, *, group_size: int,
             scale_bits: int = 16) -> dict:
    """Bits per layer part. `layers`: entries with layer, k_shape, v_shape and sensitivity
    {"k": {bits: kl}, "v": {...}} (bits as str or int; 16 = float costs 0 when not measured).

    Returns {"bits": {layer: (k_bits, v_bits)}, "budget_bytes", "bytes_per_token", "elements_per_token",
    "achieved_bits", "target_bits", "predicted_kl", "exact"}.
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
                opts.append(Option(str(b), part_bytes_per_token(heads, dim, b, group_size, scale_bits), floor))
            items.append((f"{e['layer']}.{part}", opts[::-1]))
    budget = int(math.floor(target_bits * elements / 8 + 1e-9))
    need = sum(min(o.bytes for o in opts) for _, opts in items)
    if need > budget:
        raise MixqError(f"target {target_bits} bits is below what the smallest candidate ({min(candidates)}-bit) "
                        f"needs: {8 * need / elements:.3f} average bits with scales")
    sol = knapsack(items, budget, prefer_larger=True)
    bits = {e["layer"]: (int(sol.choices[f"{e['layer']}.k"]), int(sol.choices[f"{e['layer']}.v"])) for e in layers}
    return {
        "bits": bits,
        "target_bits": float(target_bits),
        "budget_bytes": budget,
        "bytes_per_token": sol.item_bytes,
        "elements_per_token": elements,
        "achieved_bits": round(8 * sol.item_bytes / elements, 6),
        "predicted_kl": sol.total_cost,
        "exact": sol.exact,
    }


def uniform(layers: list[dict], k_bits: int, v_bits: int | None = None) -> dict:
    """The same bits everywhere: {layer: (k_bits, v_bits)}."""
    v_bits = k_bits if v_bits is None else v_bits
    return {e["layer"]: (k_bits, v_bits) for e in layers}
