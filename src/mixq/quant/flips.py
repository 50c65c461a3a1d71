"""Routing flips: the part of a rounding's KL in an MoE model that the Fisher estimate cannot see.

The Fisher form (`mixq.quant.estimate`) is the KL's second-order expansion, smooth in the weights. A
router's top-k choice is a step: where the k-th chosen expert and the first one left out score alike, a
small error upstream swaps them and the block's output jumps. On demo-moe (top-2 of 8) such swaps carry
most of the exact KL of early tensors (layer 1's v_proj at 4:64: 81 % of it from 1.1 % of positions), so
the exact / estimate ratio grows with depth above the last router and with the bits (a flip's cost falls
like the error, the Fisher term like its square), while the deepest tensor of a kind, which calibrates
the estimate, sits past every router.

The model, per tensor and format: at router r and position t, the rounding shifts the selection margin
m_rt (k-th chosen minus (k+1)-th, >= 0) by d_rt ~ N(0, s^2), one s for the tensor across its downstream
routers; the choice flips when d_rt < -m_rt, and a flip costs C_rt = 1/2 (g_t . dy_rt)^2, the Fisher
quadratic of the jump dy a flip makes at the block output (g: the sampled-label gradient there, so the
later positions the jump reaches are counted). The expected KL per position is
    F = 1/N sum_{r after the tensor} sum_t C_rt Phi(-m_rt / s),   s^2 = sum_{r,t} d_rt^2 / (N R),
with sum d^2 from a second cotangent carried down the backward sweep, sum_{r,t} xi_rt grad m_rt (random
signs xi, so its second moments are the margins' sum of squares in expectation), put through the same
Kronecker-factored form as the Fisher (`FisherStats.parts`).
"""

from __future__ import annotations

import math

from mixq.core import routing


class RouterFlips:
    """Per router: every position's margin and flip cost; per batch, the margin cotangent at the current
    block's output while the backward sweep walks down."""

    def __init__(self, runner, seed: int = 0):
        self.runner, self.seed = runner, seed
        self.routers = [i for i in range(runner.num_blocks) if routing.gate(runner, i) is not None]
        self.cot: dict = {}      # batch -> margin cotangent at the current block's output
        self._m: dict = {}       # router -> per batch margins (flat)
        self._c: dict = {}       # router -> per batch flip costs (flat)
        self._cat: dict = {}

    def __bool__(self) -> bool:
        return bool(self.routers)

    def signs(self, i: int, b: int, shape):
        """The random signs of router i's margins in batch b (keyed by the seed, so a run is repeatable)."""
        import mlx.core as mx

        key = mx.random.key((self.seed * 1_000_003 + i * 1_009 + b) % (1 << 31))
        return mx.random.bernoulli(key=key, shape=shape).astype(mx.float32) * 2 - 1

    def terms(self, i: int, b: int, h_in, g_out) -> tuple:
        """Block i's router for batch b (graphs, not evaluated): the margin cotangent it adds at the block
        input, the margins and the flip costs."""
        import mlx.core as mx

        r = self.runner
        g = routing.gate(r, i)
        x = routing.mixer_input(r, i, h_in)
        s, orig = routing.selection_scores(g, x)
        order = routing.ranked(g, s)
        xi = self.signs(i, b, order.shape[:-1])

        def signed(h):
            scores, _ = routing.selection_scores(g, routing.mixer_input(r, i, h))
            return (routing.margin(g, scores, order) * xi).sum()

        _, (inj,) = mx.vjp(signed, [h_in], [mx.array(1.0, dtype=mx.float32)])
        m = routing.margin(g, s, order)
        dy = routing.flip_delta(r, i, x, order, orig)
        c = 0.5 * mx.square((g_out.astype(mx.float32) * dy).sum(axis=-1))
        return inj.astype(h_in.dtype), m.reshape(-1), c.reshape(-1)

    def block_graph(self, i: int, b: int, h_in, g_out, f, zeros, recs) -> tuple:
        """Batch b's flip work at block i, as graphs: the carried margin cotangent's vector-Jacobian product
        through the block (`f(h, *probes)`, the recorders quiet: the first product recorded the inputs) and
        block i's router terms."""
        import mlx.core as mx

        for r in recs.values():
            r.quiet = True
        carried = self.cot.get(b)
        fv = mx.vjp(f, [h_in, *zeros], [carried])[1] if carried is not None else None
        for r in recs.values():
            r.probe = None
        terms = self.terms(i, b, h_in, g_out) if i in self.routers else None
        for r in recs.values():
            r.quiet = False
        return fv, terms

    def take(self, i: int, b: int, graphs: tuple, order: list) -> tuple:
        """`block_graph`'s results, evaluated: the cotangent carried on to the block below; returns the
        margin cotangent at each layer's output (path -> array, or None) and the block forwards spent."""
        import mlx.core as mx

        fv, terms = graphs
        cot = fv[0] if fv is not None else None
        units = 3 if fv is not None else 0
        if terms is not None:
            inj, m, c = terms
            self.record(i, m, c)
            cot = inj if cot is None else cot + inj
            units += 1  # the routed experts once more (k + 1 of them) for the jump
        if cot is not None:
            mx.eval(cot)
            self.cot[b] = cot
        return (dict(zip(order, fv[1:])) if fv is not None else None), units

    def record(self, i: int, m, c) -> None:
        self._m.setdefault(i, []).append(m)
        self._c.setdefault(i, []).append(c)
        self._cat.clear()

    def downstream(self, layer) -> list:
        """The routers a tensor of this block (None: the embedding) reaches."""
        return [i for i in self.routers if layer is None or i > layer]

    def cost(self, layer, q: float, n_positions: int) -> float:
        """F for a tensor of block `layer` whose rounding shifts the margins by q = sum_{r,t} d_rt^2."""
        import numpy as np
        from scipy.special import ndtr

        rs = tuple(i for i in self.downstream(layer) if i in self._m)
        if not rs or q <= 0:
            return 0.0
        if rs not in self._cat:  # float64: the far tail of Phi is what small errors flip
            self._cat[rs] = (np.concatenate([np.array(a, dtype=np.float64) for i in rs for a in self._m[i]]),
                             np.concatenate([np.array(a, dtype=np.float64) for i in rs for a in self._c[i]]))
        m, c = self._cat[rs]
        s = math.sqrt(q / (n_positions * len(rs)))
        return float(c @ ndtr(-m / s)) / n_positions

    def summary(self) -> dict:
        """Per router: positions, median margin, mean flip cost (for the sensitivity document)."""
        import numpy as np

        out = {}
        for i in self.routers:
            if i not in self._m:
                continue
            m = np.concatenate([np.array(a) for a in self._m[i]])
            c = np.concatenate([np.array(a) for a in self._c[i]])
            out[str(i)] = {"positions": int(m.size), "median_margin": float(f"{np.median(m):.4g}"),
                           "mean_flip_cost": float(f"{c.mean():.4g}")}
        return out
