"""One option per item (a format per tensor, bits per K/V part) minimising total cost within a byte budget.

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
4. The few "free" items left are solved by a numpy dynamic program over Pareto-optimal (bytes, cost)
   states, pruning states whose Lagrangian completion bound exceeds the incumbent. This is exact (to a
   1e-9 relative float tolerance). Only contrived inputs (hundreds of near-identical items with
   incommensurate byte sizes) grow the state list past `max_states` (or `max_candidates` expansions
   per item); then it keeps the most promising states (a beam), finishes in about a second for 500
   items, and says exact=False. `gap` always bounds how far from optimal the answer can be.

Deterministic: the same input gives the same answer. Among options with equal bytes and cost the first
listed wins; among solutions of equal cost the one with fewer bytes wins, or with `prefer_larger` the budget
left is spent on options that cost no more than the chosen ones (largest gain first): the KV cache's
allocation, where bytes under the ceiling buy safety against measurement noise.

One solver for every allocation: the weights' formats (`mixq.quant.plan`) and the KV cache's bits
(`mixq.kvcache.policy`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

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
    max_states: int = 20_000,
    max_candidates: int = 40_000,
    prefer_larger: bool = False,
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

    greedy, lam = _greedy(fronts, cap - min_bytes)
    ub = sum(c for _, c, _ in greedy)
    incumbent = [g[2] for g in greedy]
    lower, fixed_choice, free = _reduced_cost_fixing(fronts, lam, cap, ub, tol)

    peak, truncated = 1, False
    if free and ub - lower > tol:
        cap_free = cap - sum(b for b, _, _ in fixed_choice.values())
        base_cost = sum(c for _, c, _ in fixed_choice.values())
        best = _dp(free, cap_free, lam, ub - base_cost, tol, max_states, max_candidates)
        if best is not None:
            picks, dp_cost, peak, truncated = best
            dp_bytes = sum(b for b, _, _ in fixed_choice.values()) + sum(b for b, _, _ in picks)
            if (dp_cost + base_cost, dp_bytes) < (ub, _sum_bytes(opts, incumbent)):
                for i, o in fixed_choice.items():
                    incumbent[i] = o[2]
                for (i, _), o in zip(free, picks):
                    incumbent[i] = o[2]

    if prefer_larger:
        _spend_on_ties(opts, incumbent, cap)
    picked = {names[i]: opts[i][j] for i, j in enumerate(incumbent)}
    item_bytes = sum(o.bytes for o in picked.values())
    total_cost = sum(o.cost for o in picked.values())
    exact = not truncated or total_cost - lower <= tol
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


def _greedy(fronts: list, slack: int) -> tuple[list, float]:
    """LP relaxation by greedy over the lower hulls' segments (best cost saved per byte first), then what
    slack is left spent on the cheapest option that still fits, hull vertex or not. -> (one option per item,
    the Lagrange multiplier: the efficiency of the first segment that did not fit)."""
    hulls = [_lower_hull([(b, c) for b, c, _ in f]) for f in fronts]
    segs = []
    for i, h in enumerate(hulls):
        for k in range(len(h) - 1):
            (b0, c0, _), (b1, c1, _) = fronts[i][h[k]], fronts[i][h[k + 1]]
            segs.append(((c0 - c1) / (b1 - b0), i, k, b1 - b0))
    segs.sort(key=lambda s: (-s[0], s[1], s[2]))
    pos = [0] * len(fronts)  # current hull vertex per item (greedy incumbent)
    lam, critical, blocked = 0.0, False, set()
    for eff, i, k, db in segs:
        if i in blocked:
            continue
        if db <= slack:
            pos[i] = k + 1
            slack -= db
        else:
            if not critical:  # the first segment that does not fit sets lambda
                critical, lam = True, eff
            blocked.add(i)
    greedy = []
    for i, f in enumerate(fronts):
        cur = f[hulls[i][pos[i]]]
        best = max((o for o in f if o[0] - cur[0] <= slack), key=lambda o: o[0])
        slack -= best[0] - cur[0]
        greedy.append(best)
    return greedy, lam


def _reduced_cost_fixing(fronts: list, lam: float, cap: int, ub: float, tol: float) -> tuple[float, dict, list]:
    """The Lagrangian lower bound at `lam`, and per item the options whose reduced cost can still beat the
    incumbent's cost `ub`: -> (bound, item -> its only such option, [(item, its options)] for the rest)."""
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
    return lower, fixed_choice, free


def _spend_on_ties(opts: list[list[Option]], choice: list[int], cap: int) -> None:
    """In place: items moved to a larger option costing no more than theirs while the budget allows, the
    largest gain first (ties: item, then option, in listed order)."""
    slack = cap - _sum_bytes(opts, choice)
    ups = [(opts[i][choice[i]].bytes - o.bytes, i, j) for i, ol in enumerate(opts) for j, o in enumerate(ol)
           if o.bytes > opts[i][choice[i]].bytes and o.cost <= opts[i][choice[i]].cost]
    for _, i, j in sorted(ups):   # the largest gain (most negative) first
        cur, o = opts[i][choice[i]], opts[i][j]
        if o.bytes > cur.bytes and o.cost <= cur.cost and o.bytes - cur.bytes <= slack:
            slack -= o.bytes - cur.bytes
            choice[i] = j


def _sum_bytes(opts: list[list[Option]], choice: list[int]) -> int:
    return sum(opts[i][j].bytes for i, j in enumerate(choice))


def _dp(free, cap, lam, ub, tol, max_states, max_candidates):
    """Exact DP over the free items' Pareto (bytes, cost) states with Lagrangian bound pruning.

    Vectorised with numpy: each layer expands every state by every kept option of one item, drops
    those that cannot fit or cannot beat the incumbent, and keeps the Pareto front (bytes ascending,
    cost strictly descending). Returns (chosen option per free item, cost, peak state count,
    truncated) or None when nothing beats the incumbent cost `ub` (then the incumbent is optimal).
    """
    n = len(free)
    ob = [np.array([o[0] for o in keep], dtype=np.int64) for _, keep in free]
    oc = [np.array([o[1] for o in keep], dtype=np.float64) for _, keep in free]
    # Suffix sums over items k..n-1: smallest bytes, Lagrangian minimum, and the lambda-greedy
    # completion (first argmin = smallest bytes) used to improve the incumbent on the fly.
    greedy_pick = [int(np.argmin(c + lam * b)) for b, c in zip(ob, oc)]
    rem_min = np.zeros(n + 1, dtype=np.int64)
    rem_lag, rem_gb, rem_gc = np.zeros(n + 1), np.zeros(n + 1, dtype=np.int64), np.zeros(n + 1)
    for k in range(n - 1, -1, -1):
        g = greedy_pick[k]
        rem_min[k] = rem_min[k + 1] + ob[k][0]
        rem_lag[k] = rem_lag[k + 1] + oc[k][g] + lam * ob[k][g]
        rem_gb[k] = rem_gb[k + 1] + ob[k][g]
        rem_gc[k] = rem_gc[k + 1] + oc[k][g]

    B, C = np.zeros(1, dtype=np.int64), np.zeros(1)
    parents, picks_at = [], []  # per layer: index of the parent state, option taken
    incumbent = None  # (layer k, parent index in layer k-1, option) of an improving greedy completion
    peak, truncated = 1, False
    for k in range(n):
        K, S = len(ob[k]), len(B)
        # Option-major layout: K runs each already sorted by bytes, which the stable sort merges fast.
        nb = (ob[k][:, None] + B[None, :]).ravel()
        nc = (oc[k][:, None] + C[None, :]).ravel()
        par = np.tile(np.arange(S), K)
        opt = np.repeat(np.arange(K), S)
        comp_ok = nb + rem_gb[k + 1] <= cap
        if comp_ok.any():
            comp = np.where(comp_ok, nc + rem_gc[k + 1], np.inf)
            a = int(np.argmin(comp))
            if comp[a] < ub:
                ub, incumbent = float(comp[a]), (k, int(par[a]), int(opt[a]))
        bound = nc + rem_lag[k + 1] - lam * (cap - nb)
        ok = np.flatnonzero((nb + rem_min[k + 1] <= cap) & (bound <= ub + tol))
        ok = ok[np.argsort(nb[ok], kind="stable")]  # by bytes; ties stay in generation order
        nb, nc, par, opt, bound = nb[ok], nc[ok], par[ok], opt[ok], bound[ok]
        if len(nc):
            # Pareto front: keep a state only if cheaper than every smaller-or-equal one before it,
            # then only the last (cheapest) of each equal-bytes run.
            keep = nc < np.concatenate(([np.inf], np.minimum.accumulate(nc)[:-1]))
            nb, nc, par, opt, bound = nb[keep], nc[keep], par[keep], opt[keep], bound[keep]
            keep = np.concatenate((nb[1:] != nb[:-1], [True]))
            nb, nc, par, opt, bound = nb[keep], nc[keep], par[keep], opt[keep], bound[keep]
        # Bound the next layer's work (states x options); the last layer needs no bound.
        limit = min(max_states, max_candidates // len(ob[k + 1])) if k + 1 < n else len(nb)
        if len(nb) > max(1, limit):
            truncated = True
            # Most promising by bound, then cost, then bytes; re-sorted by bytes for the next layer.
            best = np.sort(np.lexsort((nb, nc, bound))[:max(1, limit)])
            nb, nc, par, opt = nb[best], nc[best], par[best], opt[best]
        B, C = nb, nc
        parents.append(par)
        picks_at.append(opt)
        peak = max(peak, len(B))
        if not len(B):
            break

    def backtrack(layer: int, s: int) -> list[int]:
        out = []
        for k in range(layer, -1, -1):
            out.append(int(picks_at[k][s]))
            s = int(parents[k][s])
        return out[::-1]

    found = []  # (cost, bytes, picks) of each complete candidate
    if len(B) and len(parents) == n:
        s = int(np.argmin(C))  # costs strictly fall as bytes grow: the unique cheapest state
        found.append((float(C[s]), int(B[s]), backtrack(n - 1, s)))
    if incumbent is not None:
        k, p, j = incumbent
        picks = (backtrack(k - 1, p) if k else []) + [j] + greedy_pick[k + 1:]
        found.append((ub, sum(int(ob[t][x]) for t, x in enumerate(picks)), picks))
    if not found:
        return None
    cost, _, picks = min(found, key=lambda f: (f[0], f[1]))
    return [free[k][1][j] for k, j in enumerate(picks)], cost, peak, truncated
