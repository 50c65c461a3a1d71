"""The embedding's and the head's sensitivities, outside the blocks (a part of `calibpass.Calibration`).

Method estimate: the lookup role's per-position estimate and the head role's Fisher estimate, the head role
calibrated by its exact KL (a head-only KL) at the formats nearest the target; method exact: the head
measured exactly at every format. A tied table gets both roles summed.
"""

from __future__ import annotations

from mixq.core.formats import tensor_bytes
from mixq.core.head import compare_many
from mixq.quant.estimate import embedding_estimate, head_estimate, near_formats, rounded_estimates
from mixq.quant.qweight import round_weights
from mixq.quant.sensitivity import _round, fit_calibration

HEAD_GROUP_BYTES = 512 << 20  # packed heads compared against one computation of the reference's chunks


class OutsideBlocks:
    """Mixed into `Calibration`: reads its runner, rounding, stores and the statistics its sweeps kept."""

    def outside_blocks(self, fwd, grads: list) -> dict:
        """Every candidate format of the embedding and the head. Method estimate: the lookup role's
        per-position estimate and the head role's Fisher estimate, the head role calibrated by its exact
        KL (a head-only KL) at the formats nearest the target; method exact: the head measured exactly at
        every format (the embedding is measured in its own stream). A tied table gets both roles summed."""
        self._stage("embedding and head")
        r = self.runner
        emb, head_path = f"{r.embed_path}.weight", r.head_path
        estimate = self.method == "estimate"
        wanted = [p for p in dict.fromkeys((emb, head_path)) if p in self.by_path and f"t:{p}" not in self.store.done
                  and (p == head_path or estimate)]
        out: dict = {}
        units = 0.0
        for path in wanted:
            if estimate:
                costs, fit, u = self._outside_estimated(path, fwd, grads)
            else:
                (costs, u), fit = self._head_exact(path, fwd), None
            units += u
            out[path] = costs
            self.store.add({"id": f"t:{path}", "path": path, "estimates": costs, **({"head_fit": fit} if fit else {})})
        self._done("embedding and head", units)
        return out

    def _outside_estimated(self, path: str, fwd, grads: list) -> tuple:
        import mlx.core as mx

        r = self.runner
        emb, head_path = f"{r.embed_path}.weight", r.head_path
        head = r.head()
        t = self.by_path[path]
        stored = r.head_weight() if path == head_path else r.embed_table()
        fmts = self._pairs(t)
        near = near_formats(t.shape, fmts, self.target, self.source_dtypes.get(path, t.dtype))
        batches = self._sweep().batches
        N, nb = self.n_positions, len(fwd.references)
        rows = [ref.hn for ref in fwd.references] if t.shape[-1] > N else None
        is_head = path == head_path

        flips = self._flips if path == emb else None
        # what the estimates read, evaluated here: a worker thread cannot evaluate this thread's graphs
        mx.eval(batches, [x for x in (grads, self._embed_flip, self._head_fisher, self._head_gram, rows)
                          if x is not None])

        def est(q, cheap=False):
            lookup, shift = embedding_estimate(grads, batches, lambda x: stored[x].astype(mx.float32), q, N,
                                               self._embed_flip if flips else None) if path == emb else (0.0, 0.0)
            role = head_estimate(self._head_fisher, self._head_gram, stored, q, N, rows, diagonal=cheap) \
                if is_head else 0.0
            return (lookup, role, shift)

        measured: list = []   # the near formats as written: the head role's exact KL calibrates its estimate
        parts = rounded_estimates(self.rounding, path, stored, fmts, near, est, cheap=lambda q: est(q, cheap=True),
                                  on_solved=(lambda f, q: measured.append((f, q))) if is_head else None)
        units = 0.0
        fit = None
        if measured:
            totals = dict.fromkeys((str(f) for f, _ in measured), 0.0)
            for b, ref in enumerate(fwd.references):
                if self.compare_at is not None:
                    ref = ref.take(self.compare_at[b])
                res = compare_many([(r.head({head_path: q}), ref.hn) for _, q in measured], ref, head)
                for (f, _), got in zip(measured, res):
                    totals[str(f)] += got["kl"].sum().item()
            units += nb * self.head_units * (1 + len(measured)) * self.compared / N
            points = [(path, f, parts[f][1], v / self.compared) for f, v in totals.items()]
            fit = fit_calibration(points, {path: "head"})["kinds"]["head"]
            fit["points"] = [{"format": f, "estimate": _round(e), "exact": _round(x)} for _, f, e, x in points]
        measured.clear()
        c = fit["c"] if fit else 1.0
        # the estimates' own matmuls, in head projections: width/positions of one each (rows: one each)
        reach = 1.0 if rows is not None else min(1.0, t.shape[-1] / max(1, N))
        units += nb * self.head_units * reach * 2 * len(near) if is_head else 0.0
        return {f: _round(lk + c * hr + (flips.cost(None, q, N) if flips else 0.0))
                for f, (lk, hr, q) in parts.items()}, fit, units

    def _head_exact(self, path: str, fwd) -> tuple:
        """The head at every candidate format, each measured exactly (groups of packed heads compared
        against one computation of the reference's chunks); and its cost in block forwards."""
        r = self.runner
        head = r.head()
        t = self.by_path[path]
        fmts = self._pairs(t)
        totals = dict.fromkeys(map(str, fmts), 0.0)
        units = 0.0
        batch: list = []
        for k, f in enumerate(fmts):
            batch.append(f)
            if k + 1 < len(fmts) and sum(tensor_bytes(t.shape, g, t.dtype) for g in batch + [fmts[k + 1]]) \
                    <= HEAD_GROUP_BYTES:
                continue
            solved = round_weights(self.rounding, path, r.head_weight(), batch)
            group = [(g, solved[str(g)]) for g in batch]
            for ref in fwd.references:
                res = compare_many([(r.head({path: q}), ref.hn) for _, q in group], ref, head)
                for (g, _), got in zip(group, res):
                    totals[str(g)] += got["kl"].sum().item()
            units += len(fwd.references) * self.head_units * (1 + len(group))
            del solved, group
            batch = []
        return {f: _round(v / self.n_positions) for f, v in totals.items()}, units
