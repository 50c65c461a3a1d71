"""Pick one format per tensor to minimise total measured sensitivity within a byte budget.

This is the multiple-choice knapsack problem (MCKP): items (tensors) each have options (format, bytes,
cost), exactly one option per item, total bytes <= budget, minimise total cost. It is solved exactly:

1. Per item, drop dominated options (another option is no bigger and no costlier) and take the lower
   convex hull of the rest.
2. The LP relaxation is solved exactly by the classic greedy over hull segments, sorted by cost saved
   per byte (Sinha & Zoltners). The slope of the one segment that does not fit is the optimal Lagrange
   multiplier lambda; L(lambda) = sum_i min_j (c_ij + lambda b_ij) - lambda * capacity is a lower bound
   on every feasible solution's cost. Continuing the greedy past that segment gives a feasible
   incumbent (upper bound).
3. Reduced-cost fixing: any feasible x costs at least L(lambda) + sum_i rc_i(x_i), where
   rc_ij = c_ij + lambda b_ij - min_k (c_ik + lambda b_ik) >= 0. So an option with rc_ij > UB - LB is
   never in an optimal solution. Usually almost every item is left with a single option.
4. The few "free" items left are solved by a dynamic program over Pareto-optimal (bytes, cost) states,
   pruning states whose Lagrangian completion bound exceeds the incumbent. This is exact (up to a 1e-9
   relative float tolerance). If the state list ever exceeds `max_states`, it keeps the most promising
   ones (beam) and the result says exact=False; `gap` then bounds how far from optimal it can be.

Ties are broken deterministically: among equal (bytes, cost) options the first listed wins, and among
equally cheap solutions the smaller one wins, then the first found in item order.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

from mixq.core.errors import MixqError


@dataclass(frozen=True)
class Option:
    name: str
    bytes: int
    cost: float


@dataclass
class Allocation:
    """The chosen option per item and how good the choice provably is."""

    choices: dict[str, str]  # item -> option name
    picked: dict[str, Option]  # item -> full option
    total_bytes: int  # item bytes + fixed bytes
    item_bytes: int
    fixed_bytes: int
    budget_bytes: int
    total_cost: float
    lower_bound: float  # Lagrangian (= LP relaxation) bound: no feasible choice costs less
    gap: float  # total_cost - lower_bound, >= 0; an upper bound on the suboptimality
    exact: bool  # proven optimal (to float tolerance)
    feasible: bool
    lagrange_multiplier: float  # cost per byte at the budget's margin
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["picked"] = {k: {"option": o.name, "bytes": o.bytes, "cost": o.cost} for k, o in self.picked.items()}
        return d


def _as_option(o: Any) -> Option:
    if isinstance(o, Option):
        opt = o
    elif isinstance(o, Mapping):
        opt = Option(str(o["name"]), o["bytes"], o["cost"])
    else:
        name, nbytes, cost = o
        opt = Option(str(name), nbytes, cost)
    if isinstance(opt.bytes, bool) or int(opt.bytes) != opt.bytes or opt.bytes < 0:
        raise MixqError(f"option {opt.name!r}: bytes must be a non-negative integer, got {opt.bytes!r}")
    cost = float(opt.cost)
    if math.isnan(cost) or cost == -math.inf:
        raise MixqError(f"option {opt.name!r}: cost must be a number or +inf, got {opt.cost!r}")
    return Option(opt.name, int(opt.bytes), cost)


def _normalize(items: Any) -> tuple[list[str], list[list[Option]]]:
    pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
    names: list[str] = []
    opts: list[list[Option]] = []
    seen: set[str] = set()
    for name, options in pairs:
        name = str(name)
        if name in seen:
            raise MixqError(f"item {name!r} listed twice")
        seen.add(name)
        ol = [_as_option(o) for o in options]
        if len({o.name for o in ol}) != len(ol):
            raise MixqError(f"item {name!r}: option names must be unique")
        # +inf cost marks an option as forbidden.
        ol = [o for o in ol if o.cost != math.inf]
        if not ol:
            raise MixqError(f"item {name!r} has no usable option")
        names.append(name)
        opts.append(ol)
    return names, opts


def _frontier(ol: list[Option]) -> list[int]:
    """Indices of non-dominated options: bytes ascending, cost strictly descending."""
    order = sorted(range(len(ol)), key=lambda j: (ol[j].bytes, ol[j].cost, j))
    keep, best = [], math.inf
    for j in order:
        if ol[j].cost < best:
            keep.append(j)
            best = ol[j].cost
    return keep


def _lower_hull(pts: list[tuple[int, float]]) -> list[int]:
    """Positions (into pts, sorted by bytes) of the lower convex hull's vertices."""
    hull: list[int] = []
    for k, (x, y) in enumerate(pts):
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = pts[hull[-2]], pts[hull[-1]]
            # Drop the middle point unless the turn is strictly counter-clockwise (convex from below).
            if (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) <= 0:
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


def allocate(
    items: Mapping[str, Iterable[Any]] | Iterable[tuple[str, Iterable[Any]]],
    budget_bytes: int,
    *,
    fixed_bytes: int = 0,
    max_states: int = 200_000,
) -> Allocation:
    """Choose one option per item minimising total cost with item bytes + fixed_bytes <= budget_bytes.

    `items` maps item name -> options, each an `Option`, a (name, bytes, cost) tuple or a dict with
    those keys. Cost +inf forbids an option. Raises MixqError when no choice fits the budget.
    """
    t0 = time.perf_counter()
    names, opts = _normalize(items)
    cap = int(budget_bytes) - int(fixed_bytes)
    # Per item: frontier options as (bytes, cost, original index), bytes ascending.
    fronts = [[(ol[j].bytes, ol[j].cost, j) for j in _frontier(ol)] for ol in opts]
    min_bytes = sum(f[0][0] for f in fronts)
    if min_bytes > cap:
        raise MixqError(
            f"budget of {int(budget_bytes)} bytes is infeasible: the smallest reachable size is "
            f"{min_bytes + int(fixed_bytes)} bytes ({min_bytes} for the {len(names)} allocatable tensors at "
            f"their smallest options + {int(fixed_bytes)} fixed)")
    scale = sum(max(abs(c) for _, c, _ in f) for f in fronts) or 1.0
    tol = 1e-9 * scale

    # -- LP relaxation by greedy over hull segments; the critical segment's slope is lambda.
    hulls = [_lower_hull([(b, c) for b, c, _ in f]) for f in fronts]
    segs = []
    for i, h in enumerate(hulls):
        for k in range(len(h) - 1):
            (b0, c0, _), (b1, c1, _) = fronts[i][h[k]], fronts[i][h[k + 1]]
            segs.append(((c0 - c1) / (b1 - b0), i, k, b1 - b0))
    segs.sort(key=lambda s: (-s[0], s[1], s[2]))
    pos = [0] * len(fronts)  # current hull vertex per item (greedy incumbent)
    slack = cap - min_bytes
    lam, critical, blocked = 0.0, None, set()
    for eff, i, k, db in segs:
        if i in blocked:
            continue
        if db <= slack:
            pos[i] = k + 1
            slack -= db
        else:
            if critical is None:
                critical, lam = (i, k), eff
            blocked.add(i)
    greedy = [fronts[i][hulls[i][pos[i]]] for i in range(len(fronts))]
    ub = sum(c for _, c, _ in greedy)
    incumbent = [g[2] for g in greedy]

    # -- Lagrangian bound and reduced-cost fixing.
    reduced = [[c + lam * b for b, c, _ in f] for f in fronts]
    mins = [min(r) for r in reduced]
    lower = sum(mins) - lam * cap
    threshold = ub - lower + tol
    fixed_choice: dict[int, tuple[int, float, int]] = {}
    free: list[tuple[int, list[tuple[int, float, int]]]] = []
    for i, f in enumerate(fronts):
        keep = [o for o, r in zip(f, reduced[i]) if r - mins[i] <= threshold]
        if len(keep) == 1:
            fixed_choice[i] = keep[0]
        else:
            free.append((i, keep))

    exact, peak, truncated = True, 1, False
    if free and ub - lower > tol:
        cap_free = cap - sum(b for b, _, _ in fixed_choice.values())
        base_cost = sum(c for _, c, _ in fixed_choice.values())
        best = _dp(free, cap_free, lam, ub - base_cost, tol, max_states)
        if best is not None:
            picks, dp_cost, peak, truncated = best
            dp_bytes = sum(b for b, _, _ in fixed_choice.values()) + sum(b for b, _, _ in picks)
            if (dp_cost + base_cost, dp_bytes) < (ub, _sum_bytes(opts, incumbent)):
                for i, o in fixed_choice.items():
                    incumbent[i] = o[2]
                for (i, _), o in zip(free, picks):
                    incumbent[i] = o[2]
        exact = not truncated

    picked = {names[i]: opts[i][j] for i, j in enumerate(incumbent)}
    item_bytes = sum(o.bytes for o in picked.values())
    total_cost = sum(o.cost for o in picked.values())
    return Allocation(
        choices={k: o.name for k, o in picked.items()},
        picked=picked,
        total_bytes=item_bytes + int(fixed_bytes),
        item_bytes=item_bytes,
        fixed_bytes=int(fixed_bytes),
        budget_bytes=int(budget_bytes),
        total_cost=total_cost,
        lower_bound=lower,
        gap=max(0.0, total_cost - lower),
        exact=exact,
        feasible=item_bytes <= cap,
        lagrange_multiplier=lam,
        stats={
            "items": len(names),
            "options": sum(len(o) for o in opts),
            "free_items": len(free),
            "peak_states": peak,
            "seconds": round(time.perf_counter() - t0, 4),
        },
    )


def _sum_bytes(opts: list[list[Option]], choice: list[int]) -> int:
    return sum(opts[i][j].bytes for i, j in enumerate(choice))


def _dp(free, cap, lam, ub, tol, max_states):
    """Exact DP over the free items' Pareto (bytes, cost) states with Lagrangian bound pruning.

    Returns (chosen option per free item, cost, peak state count, truncated) or None when no state
    beats the incumbent cost `ub` (then the incumbent is optimal).
    """
    n = len(free)
    # Suffix sums over items k..n-1: smallest bytes, Lagrangian minimum, and the lambda-greedy
    # completion (smallest-bytes argmin) used to improve the incumbent on the fly.
    rem_min = [0] * (n + 1)
    rem_lag = [0.0] * (n + 1)
    rem_gb = [0] * (n + 1)
    rem_gc = [0.0] * (n + 1)
    greedy_pick = [None] * n
    for k in range(n - 1, -1, -1):
        keep = free[k][1]
        r = [c + lam * b for b, c, _ in keep]
        m = min(r)
        g = keep[r.index(m)]
        greedy_pick[k] = g
        rem_min[k] = rem_min[k + 1] + keep[0][0]
        rem_lag[k] = rem_lag[k + 1] + m
        rem_gb[k] = rem_gb[k + 1] + g[0]
        rem_gc[k] = rem_gc[k + 1] + g[1]

    states = [(0, 0.0, None)]  # (bytes, cost, chain of picks as nested (option, parent))
    best_complete = None  # (cost, bytes, chain, k) from a greedy completion at layer k
    peak, truncated = 1, False
    for k in range(n):
        keep = free[k][1]
        nxt = []
        for b, c, chain in states:
            for o in keep:
                nb = b + o[0]
                if nb + rem_min[k + 1] > cap:
                    break  # options are sorted by bytes
                nc = c + o[1]
                if nc + rem_lag[k + 1] - lam * (cap - nb) > ub + tol:
                    continue
                nxt.append((nb, nc, (o, chain)))
                if nb + rem_gb[k + 1] <= cap and nc + rem_gc[k + 1] < ub:
                    ub = nc + rem_gc[k + 1]
                    best_complete = (ub, nb + rem_gb[k + 1], (o, chain), k + 1)
        nxt.sort(key=lambda s: (s[0], s[1]))  # stable: ties keep generation order
        states, best_c = [], math.inf
        for s in nxt:
            if s[1] < best_c and s[1] + rem_lag[k + 1] - lam * (cap - s[0]) <= ub + tol:
                states.append(s)
                best_c = s[1]
        if len(states) > max_states:
            truncated = True
            states.sort(key=lambda s: (s[1] + rem_lag[k + 1] - lam * (cap - s[0]), s[0]))
            states = sorted(states[:max_states], key=lambda s: (s[0], s[1]))
        peak = max(peak, len(states))
        if not states:
            break

    candidates = []
    if states:
        cost = min(s[1] for s in states)
        s = next(s for s in states if s[1] == cost)  # sorted by bytes: the smallest of the cheapest
        candidates.append((s[1], s[0], s[2], n))
    if best_complete is not None:
        candidates.append(best_complete)
    if not candidates:
        return None
    cost, _, chain, depth = min(candidates, key=lambda t: (t[0], t[1]))
    picks = []
    while chain is not None:
        picks.append(chain[0])
        chain = chain[1]
    picks.reverse()
    picks.extend(greedy_pick[depth:])
    return picks, cost, peak, truncated
