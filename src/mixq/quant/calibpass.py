"""The calibration passes of a convert: one forward sweep and one backward sweep over the calibration
windows feed the reference distribution, the Hessians GPTQ rounds against, the sensitivity estimates and
the exact subset that calibrates them (see `mixq.quant.sensitivity` for the methods).

forward sweep   float reference (lse, argmax, next-token NLL per position), every block's input, labels
                sampled from the model, the head's input Gram, and the exact subset's streams (each one
                tensor at one format, from its block on), GPTQ-rounded against this sweep's block Grams
backward sweep  per block: input Grams (GPTQ), per-position inputs and output gradients -> every
                (tensor, format) estimate; at the end the embedding's Fisher
then            embedding estimates, the head's exact KL per format, the per-kind calibration fit
"""

from __future__ import annotations

import time

from mixq.core.formats import Format, applicable, bits_per_weight, tensor_bytes
from mixq.core.head import compare_many
from mixq.quant.backward import backward_sweep
from mixq.quant.estimate import ESTIMATOR, FisherStats, embedding_estimate
from mixq.quant.hessian import FISHER_SAMPLES, HessianMap, normalised_sum
from mixq.quant.plan import candidate_items
from mixq.quant.qweight import round_weights
from mixq.quant.sensitivity import METHODS, Partial, _round, fit_calibration, kind_of
from mixq.quant.sweep import ForwardSweep, Stream

SUBSET_BUDGET = 0.03   # exact subset: at most this fraction of the exact pass's block-forwards
SUBSET_INSTANCES = 1   # exact subset: the deepest instance(s) of each tensor kind
HEAD_GROUP_BYTES = 512 << 20  # packed heads compared against one computation of the reference's chunks
GPTQ_TYPES = ("Linear", "SwitchLinear", "Embedding")


def gptq_paths(anatomy, rounding: str) -> list:
    if rounding != "gptq":
        return []
    return [t.path for t in candidate_items(anatomy) if t.module_type in GPTQ_TYPES and t.path.endswith(".weight")]


def make_rounding(anatomy, rounding: str):
    """The Rounding every pass shares; its Hessians are filled in by the sweeps as they run."""
    from mixq.quant.gptq import RTN, Rounding

    paths = gptq_paths(anatomy, rounding)
    if not paths:
        return RTN, None
    H = HessianMap(paths)
    return Rounding(H, settings={"hessian": "input-gram; embedding: sampled-label fisher",
                                 "fisher_samples": FISHER_SAMPLES}), H


class Calibration:
    def __init__(self, runner, anatomy, tokens, candidates: list[Format], *, rounding, hessians, method: str,
                 target_bpw: float, source_dtypes: dict, seed: int = 0, batch_size: int = 8, partial=None,
                 key: dict | None = None, progress=None):
        self.runner, self.anatomy, self.tokens = runner, anatomy, tokens
        self.candidates = [f for f in candidates if f.is_quantized]
        self.rounding, self.hessians = rounding, hessians
        self.method, self.target = method, target_bpw
        self.source_dtypes, self.seed, self.bs = source_dtypes, seed, batch_size
        self.items = candidate_items(anatomy)
        self.by_path = {t.path: t for t in self.items}
        self.kinds = {t.path: kind_of(t.path, t.module_type) for t in self.items}
        self.store = Partial(partial, {**(key or {}), "method": METHODS[method]})
        self.resumed = sum(1 for r in self.store.done.values() if r["id"].startswith("t:"))
        self.progress = progress
        self.units: dict = {}
        self.seconds: dict = {}
        self.block_seconds: dict = {}  # stage -> seconds per block (for projections to deeper models)
        n = runner.num_blocks
        block_params = [0] * n
        for t in anatomy.tensors:
            if t.layer is not None:
                block_params[t.layer] += t.params
        mean_block = max(1, sum(block_params) // max(n, 1))
        head = anatomy.tensor(runner.head_path)
        self.head_units = head.params / mean_block  # one head projection, in block forwards
        self.n_positions = int(tokens.size)

    # -- helpers -------------------------------------------------------------------------------------
    def _pairs(self, t) -> list[Format]:
        return [f for f in self.candidates if applicable(t.shape, f)]

    def _stage(self, name: str):
        if self.progress is not None:
            self.progress.start(name)
        self._t = time.perf_counter()

    def _done(self, name: str, units: float) -> None:
        self.units[name] = self.units.get(name, 0.0) + units
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self._t
        if self.progress is not None:
            self.progress.end()

    def _sweep(self):
        return ForwardSweep(self.runner, self.anatomy, self.tokens, batch_size=self.bs,
                            gptq_paths=set(self.hessians.paths) if self.hessians else (),
                            progress=self.progress)

    def exact_pass_units(self) -> float:
        """Block-forward equivalents of measuring every pair exactly, as the exact method runs it: per block,
        one sweep (the float model through every block, the block's pairs from it on, one head projection
        per pair plus the reference's, per batch); the head's formats, one projection each plus the
        reference's per group."""
        n, nb = self.runner.num_blocks, -(-self.tokens.shape[0] // self.bs)
        groups: dict = {}
        for t in self.items:
            if t.path == self.runner.head_path and t.layer is None and not self.runner.tied:
                groups.setdefault("head", []).append(t)
            else:
                groups.setdefault(-1 if t.layer is None else t.layer, []).append(t)
        total = 0.0
        for g, ts in groups.items():
            pairs = sum(len(self._pairs(t)) for t in ts)
            if g == "head":
                total += nb * self.head_units * (pairs + 1)
                continue
            depth = n if g == -1 else n - g
            total += nb * (n + self.head_units + pairs * (depth + self.head_units))
        return total

    # -- the exact subset ------------------------------------------------------------------------------
    def subset(self) -> list[tuple[str, Format]]:
        """The deepest instance of every block tensor kind, at the two candidate formats around the target;
        the most expensive points dropped (never a kind's last) until it costs <= SUBSET_BUDGET of the pass."""
        n = self.runner.num_blocks
        fmts = sorted(self.candidates, key=lambda f: bits_per_weight(f))
        below = [f for f in fmts if bits_per_weight(f) <= self.target]
        above = [f for f in fmts if bits_per_weight(f) > self.target]
        around = ([below[-1]] if below else []) + ([above[0]] if above else [])
        by_kind: dict = {}
        for t in self.items:
            if t.layer is not None:
                by_kind.setdefault(self.kinds[t.path], []).append(t)
        points = []
        for k, ts in sorted(by_kind.items()):
            seen_layers = []
            for t in sorted(ts, key=lambda t: -t.layer):
                if len(seen_layers) == SUBSET_INSTANCES:
                    break
                if t.layer in seen_layers:
                    continue
                seen_layers.append(t.layer)
                points += [(t.path, f) for f in around if applicable(t.shape, f)]
        budget = SUBSET_BUDGET * self.exact_pass_units() / max(1, -(-self.tokens.shape[0] // self.bs))

        def cost(p):
            return n - self.by_path[p[0]].layer + self.head_units

        while points and sum(cost(p) for p in points) > budget:
            counts: dict = {}
            for p in points:
                counts[self.kinds[p[0]]] = counts.get(self.kinds[p[0]], 0) + 1
            droppable = [p for p in points if counts[self.kinds[p[0]]] > 1]
            if not droppable:
                break
            points.remove(max(droppable, key=cost))
        return points

    # -- the passes ----------------------------------------------------------------------------------
    def forward(self, subset: list) -> tuple:
        """The forward sweep (with the exact subset's streams); returns it and the subset's exact KLs."""
        import mlx.core as mx

        self._stage("calibration forward")
        streams = [Stream(f"{p}|{f}", {p: f}, self.rounding) for p, f in subset]
        fwd = self._sweep().run(streams, grams=self.hessians is not None, hessians=self.hessians,
                                keep_inputs=True, sample_key=mx.random.key(self.seed))
        nb = len(fwd.references)
        self.block_seconds["calibration forward"] = [round(x, 3) for x in fwd.block_seconds]
        # reference and label sampling: a head projection each; comparisons: the reference's again + one a stream
        self._done("calibration forward", fwd.block_forwards +
                   nb * self.head_units * (2 + (1 + len(streams) if streams else 0)))
        self._head_gram = fwd.head_gram
        self.references = fwd.references  # later sweeps on these windows compare against them
        if self.hessians is not None and not self.runner.tied and self.runner.head_path in self.hessians.paths:
            self.hessians.global_[self.runner.head_path] = fwd.head_gram
        exact = {(p, str(f)): float(fwd.streams[s.name]["kl"].mean()) for (p, f), s in zip(subset, streams)}
        return fwd, exact

    def backward(self, fwd, estimate: bool) -> list:
        """The backward sweep; with `estimate`, every block tensor's estimates (resumable). Returns the
        gradient at the embedding output per batch."""
        import mlx.core as mx

        self._stage("calibration backward" + (" + estimates" if estimate else ""))
        r = self.runner
        stats = FisherStats(self.n_positions)
        est_units = [0.0]

        def on_batch(i, recs, grads):
            if not estimate:
                return
            for p, g in grads.items():
                if p in self.by_path and f"t:{p}" not in self.store.done:
                    stats.add(p, recs[p], g)

        def on_block(i, recs):
            H = {p: rec.hessian() for p, rec in recs.items() if rec.hessian() is not None}
            if self.hessians is not None:
                self.hessians.set_block(i, H)
                self.hessians.keep(i, {p: h for p, h in H.items() if p in self.hessians.paths})
            if estimate:
                stored = r.stored(r.layer_prefix(i), r.layers[i])
                block_params = sum(self.by_path[p].params for p in recs if p in self.by_path)
                for p in recs:
                    if p not in self.by_path or f"t:{p}" in self.store.done or p not in H:
                        continue
                    solved = round_weights(self.rounding, p, stored[p], self._pairs(self.by_path[p]))
                    w32 = stored[p].astype(mx.float32)  # made after the solve, whose peak it would add to
                    costs = {f: _round(stats.estimate(p, H[p], w32 - q.full(mx.float32))) for f, q in solved.items()}
                    del solved, w32
                    self.store.add({"id": f"t:{p}", "path": p, "estimates": costs})
                    t = self.by_path[p]
                    # the estimate's matmul against a block forward: in/rows of the layer's own forward
                    reach = min(1.0, t.shape[-1] / max(1, self.n_positions))
                    est_units[0] += len(costs) * t.params / max(1, block_params) * len(fwd.references) * reach
                stats.gd.clear(), stats.rows.clear()
            if self.hessians is not None:
                self.hessians.set_block(None, {})

        res = backward_sweep(r, self.anatomy, fwd, gptq_paths=set(self.by_path), on_batch=on_batch,
                             on_block=on_block, progress=self.progress)
        nb = len(fwd.references)
        self.block_seconds["calibration backward"] = [round(x, 3) for x in res.block_seconds]
        # the head's cotangent: one projection for the softmax, one for the product with the weight
        self._done("calibration backward" + (" + estimates" if estimate else ""),
                   res.block_forwards + nb * 2 * self.head_units + est_units[0])
        return res.embed_grads

    def embedding_fisher(self, grads: list) -> None:
        """H for the embedding: the Fisher of its output (a tied table adds its head role's input Gram)."""
        import mlx.core as mx

        emb = f"{self.runner.embed_path}.weight"
        if self.hessians is None or emb not in self.hessians.paths:
            return
        fisher = None
        for g in grads:
            rows = g.reshape(-1, g.shape[-1])
            fisher = rows.T @ rows if fisher is None else fisher + rows.T @ rows
        if self.runner.tied:
            fisher = normalised_sum(fisher, self._head_gram)
        mx.eval(fisher)
        self.hessians.global_[emb] = fisher

    def outside_blocks(self, fwd, grads: list) -> dict:
        """Every candidate format of the embedding and the head: the head role measured exactly (a head-only
        KL), the lookup role estimated (method estimate; the exact method measures the embedding in its
        own stream). A tied table gets both roles summed."""
        import mlx.core as mx

        self._stage("embedding and head")
        r = self.runner
        emb, head_path = f"{r.embed_path}.weight", r.head_path
        estimate = self.method == "estimate"
        wanted = [p for p in dict.fromkeys((emb, head_path)) if p in self.by_path and f"t:{p}" not in self.store.done
                  and (p == head_path or estimate)]
        out: dict = {}
        units = 0.0
        nb = len(fwd.references)
        head = r.head()
        batches = self._sweep().batches
        for path in wanted:
            stored = head.weight if path == head_path else r.embed_table()
            fmts = self._pairs(self.by_path[path])
            totals = dict.fromkeys(map(str, fmts), 0.0)
            group: list = []

            def flush():
                # the head role: the reference's chunks computed once for a group of formats
                nonlocal units
                units += nb * self.head_units
                for ref in fwd.references:
                    res = compare_many([(r.head({head_path: q}), ref.hn) for _, q in group], ref, head)
                    for (f, _), got in zip(group, res):
                        totals[str(f)] += got["kl"].sum().item()
                group.clear()

            t = self.by_path[path]
            batch: list = []   # formats rounded together: GPTQ ones in one pass, packed results within a bound
            for k, f in enumerate(fmts):
                batch.append(f)
                if k + 1 < len(fmts) and sum(tensor_bytes(t.shape, g, t.dtype) for g in batch + [fmts[k + 1]]) \
                        <= HEAD_GROUP_BYTES:
                    continue
                solved = round_weights(self.rounding, path, stored, batch)
                for g in batch:
                    q = solved[str(g)]
                    if path == emb and estimate:
                        totals[str(g)] += embedding_estimate(grads, batches, lambda x: stored[x].astype(mx.float32),
                                                             q, 1)
                    if path == head_path:
                        group.append((g, q))
                        units += nb * self.head_units
                del solved
                batch = []
                if group:
                    flush()
            costs = {f: _round(v / self.n_positions) for f, v in totals.items()}
            out[path] = costs
            self.store.add({"id": f"t:{path}", "path": path, "estimates": costs})
        self._done("embedding and head", units)
        return out

    def exact_blocks(self, fwd) -> None:
        """The exact method: every (block tensor | embedding, format) pair measured, one sweep per block
        (its pairs as streams beside the float model, at most `max_streams` at a time)."""
        n, nb = self.runner.num_blocks, len(fwd.references)
        emb = f"{self.runner.embed_path}.weight"
        groups: dict = {}
        for t in self.items:
            if t.path == self.runner.head_path and t.path != emb:
                continue
            if f"t:{t.path}" in self.store.done:
                continue
            groups.setdefault(-1 if t.layer is None else t.layer, []).append(t)
        per_stream = 4 * int(self.tokens.size) * int(fwd.final[0].shape[-1])
        max_streams = max(1, (1 << 30) // max(per_stream, 1))
        self._stage("exact pairs")
        done = 0
        for layer in sorted(groups):
            pairs = [(t.path, f) for t in groups[layer] for f in self._pairs(t)]
            values: dict = {}
            for a in range(0, len(pairs), max_streams):
                chunk = pairs[a:a + max_streams]
                streams = [Stream(f"{p}|{f}", {p: f}, self.rounding) for p, f in chunk]
                res = self._sweep().run(streams, references=fwd.references, grams=self.hessians is not None,
                                        hessians=self.hessians)
                self.units["exact pairs"] = self.units.get("exact pairs", 0.0) + res.block_forwards + \
                    nb * self.head_units * (1 + len(streams))
                for (p, f), s in zip(chunk, streams):
                    values.setdefault(p, {})[str(f)] = _round(float(res.streams[s.name]["kl"].mean()))
            for t in groups[layer]:
                self.store.add({"id": f"t:{t.path}", "path": t.path, "estimates": values.get(t.path, {})})
            done += 1
            if self.progress is not None:
                self.progress.update(done, len(groups), "blocks")
        self._done("exact pairs", 0.0)

    def prepare_rounding(self) -> None:
        """Only what rounding needs (a reused sensitivity file): the head's Gram and the embedding's Fisher;
        block Grams come from the sweep that rounds."""
        if self.hessians is None:
            return
        fwd, _ = self.forward([])
        self.embedding_fisher(self.backward(fwd, estimate=False))

    def run(self) -> dict:
        """Measure (method estimate or exact); returns the sensitivity document (without its key)."""
        t0 = time.perf_counter()
        estimate = self.method == "estimate"
        subset = self.subset() if estimate else []
        fwd, exact_subset = self.forward(subset)
        grads = self.backward(fwd, estimate=estimate) if estimate or self.hessians is not None else None
        if grads is not None:
            self.embedding_fisher(grads)
        self.outside_blocks(fwd, grads)
        if not estimate:
            self.exact_blocks(fwd)
        raw = {rec["path"]: rec["estimates"] for rec in self.store.done.values() if rec["id"].startswith("t:")}
        calib = None
        costs = {p: dict(v) for p, v in raw.items()}
        if estimate:
            points = [(p, f, raw[p][f], ex) for (p, f), ex in exact_subset.items()]
            block_kinds = {p: k for p, k in self.kinds.items() if self.by_path[p].layer is not None}
            calib = fit_calibration(points, block_kinds)
            calib["points"] = [{"path": p, "format": f, "estimate": e, "exact": _round(x)} for p, f, e, x in points]
            for p, v in costs.items():
                if p in block_kinds:
                    c = calib["kinds"][block_kinds[p]]["c"]
                    costs[p] = {f: _round(x * c) for f, x in v.items()}
        nb = len(fwd.references)
        pairs = sum(len(self._pairs(t)) for t in self.items)
        n = self.runner.num_blocks
        tensors = {}
        for t in self.items:
            tensors[t.path] = {"module": t.module, "layer": t.layer, "shape": t.shape, "params": t.params,
                               "dtype": t.dtype, "kind": self.kinds[t.path],
                               "costs": {**costs[t.path], "float": 0.0},
                               **({"estimates": raw[t.path]} if estimate else {})}
        total_units = sum(self.units.values())
        return {
            "method": METHODS[self.method],
            **({"estimator": ESTIMATOR} if estimate else {}),
            "tensors": tensors,
            **({"calibration": calib} if calib is not None else {}),
            "cost": {
                "measurements": pairs,
                "exact_measurements": len(subset) if estimate else pairs,
                "resumed_tensors": self.resumed,
                "block_forward_equivalents": {k: round(v, 1) for k, v in self.units.items()},
                "total_block_forward_equivalents": round(total_units, 1),
                "exact_pass_block_forward_equivalents": round(self.exact_pass_units(), 1),
                "naive_block_forward_equivalents": round(pairs * nb * (n + 2 * self.head_units), 1),
                "head_projection_block_forwards": round(self.head_units, 3),
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
                "block_seconds": self.block_seconds,
                "total_seconds": round(time.perf_counter() - t0, 2),
                "batches": nb,
            },
        }
