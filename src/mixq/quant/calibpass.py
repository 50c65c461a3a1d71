"""The calibration passes of a convert: one forward sweep and one backward sweep over the calibration
windows feed the reference distribution, the Hessians GPTQ rounds against, the sensitivity estimates and
the exact subset that calibrates them (see `mixq.quant.sensitivity` for the methods).

forward sweep   float reference (lse, argmax, next-token NLL per position) and labels sampled from the
                model (one head projection), every block's input, the head's input Gram, and the exact
                subset's streams (each one tensor at one format, from its block on), GPTQ-rounded against
                this sweep's block Grams
backward sweep  per block: input Grams (GPTQ), per-position inputs and output gradients -> every
                (tensor, format) estimate; at the end the embedding's Fisher; the head's Fisher diagonal
then            embedding and head estimates (the head role calibrated by its exact KL at the formats
                nearest the target), the per-kind calibration fit

Estimates take the rounding that will be written, but GPTQ is solved only at the formats nearest the
target (`mixq.quant.estimate.rounded_estimates`): the others are round-to-nearest estimates scaled by the
gain GPTQ measured there. Solving every format was most of the estimate stage's time.
"""

from __future__ import annotations

import threading
import time

from mixq.core.formats import Format, applicable, bits_per_weight
from mixq.core.head import sample_positions
from mixq.core.lanes import thread_map
from mixq.quant.backward import backward_sweep
from mixq.quant.estimate import ESTIMATOR, FisherStats, near_formats, rounded_estimates
from mixq.quant.flips import RouterFlips
from mixq.quant.gptq import gptq_work_bytes
from mixq.quant.hessian import FISHER_SAMPLES, HessianMap, block_gram_bytes, hessian_arrays, normalised_sum
from mixq.quant.outside import OutsideBlocks
from mixq.quant.plan import candidate_items
from mixq.quant.sensitivity import METHODS, Partial, _round, fit_calibration, kind_of
from mixq.quant.sweep import ForwardSweep, Stream, batches_of

SUBSET_BUDGET = 0.03   # exact subset: at most this fraction of the exact pass's block-forwards
SUBSET_INSTANCES = 1   # exact subset: the deepest instance(s) of each tensor kind ...
SUBSET_FORMATS = 1     # ... at the format(s) nearest the target (below it first)
GPTQ_TYPES = ("Linear", "SwitchLinear", "Embedding")


def _gram(x):
    rows = x.reshape(-1, x.shape[-1])
    return rows.T @ rows


def gptq_paths(anatomy, rounding: str) -> list:
    if rounding != "gptq":
        return []
    return [t.path for t in candidate_items(anatomy) if t.module_type in GPTQ_TYPES and t.path.endswith(".weight")]


def make_rounding(anatomy, rounding: str, spill=None, keep_grams: bool = True):
    """The Rounding every pass shares; its Hessians are filled in by the sweeps as they run. `spill`: a
    directory its kept results go to (see `Rounding`); `keep_grams=False`: no block's Grams are kept for a
    later sweep (the write sweep takes its own)."""
    from mixq.quant.rounding import RTN, Rounding

    paths = gptq_paths(anatomy, rounding)
    if not paths:
        return RTN, None
    H = HessianMap(paths, expected_bytes=sum(block_gram_bytes(anatomy).values()), keep=keep_grams)
    return Rounding(H, settings={"hessian": "input-gram; embedding: sampled-label fisher",
                                 "fisher_samples": FISHER_SAMPLES}, spill=spill), H


class Calibration(OutsideBlocks):
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
        self._flips, self._embed_flip = None, None  # MoE routers' flips (mixq.quant.flips), from the backward
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
        # the exact subset's and the head fit's comparisons: on a sample of positions at large vocabularies
        counts = [int(b.size) for b in batches_of(tokens, batch_size)]
        self.compare_at = sample_positions(counts, int(head.shape[0]), seed)
        self.compared = self.n_positions if self.compare_at is None else sum(int(i.size) for i in self.compare_at)

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
        """The deepest instance of every block tensor kind, at the candidate format nearest the target;
        the most expensive points dropped (never a kind's last) until it costs <= SUBSET_BUDGET of the pass."""
        n = self.runner.num_blocks
        fmts = sorted(self.candidates, key=lambda f: bits_per_weight(f))
        below = [f for f in fmts if bits_per_weight(f) <= self.target]
        above = [f for f in fmts if bits_per_weight(f) > self.target]
        around = (([below[-1]] if below else []) + ([above[0]] if above else []))[:SUBSET_FORMATS]
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
        # Grams only where a subset stream is rounded: the backward sweep records every block's
        fwd = self._sweep().run(streams, grams=self.hessians is not None, hessians=self.hessians,
                                keep_inputs=True, sample_key=mx.random.key(self.seed),
                                gram_blocks={self.by_path[p].layer for p, _ in subset},
                                compare_positions=self.compare_at)
        nb = len(fwd.references)
        self.block_seconds["calibration forward"] = [round(x, 3) for x in fwd.block_seconds]
        # reference and label sampling: one head projection; comparisons (on the sampled positions): the
        # reference's again + one a stream
        share = self.compared / self.n_positions
        self._done("calibration forward", fwd.block_forwards +
                   nb * self.head_units * (1 + (share * (1 + len(streams)) if streams else 0)))
        self._head_gram = fwd.head_gram
        if self._head_gram is None and self.method == "estimate":  # --rounding rtn: no Grams, the head's A
            self._head_gram = sum(_gram(ref.hn) for ref in fwd.references)
            mx.eval(self._head_gram)
        self.references = fwd.references  # later sweeps on these windows compare against them
        if self.hessians is not None and not self.runner.tied and self.runner.head_path in self.hessians.paths:
            self.hessians.global_[self.runner.head_path] = fwd.head_gram
        exact = {(p, str(f)): float(fwd.streams[s.name]["kl"].mean()) for (p, f), s in zip(subset, streams)}
        return fwd, exact

    def backward(self, fwd, estimate: bool) -> list:
        """The backward sweep; with `estimate`, every block tensor's estimates (resumable). Returns the
        gradient at the embedding output per batch."""
        self._stage("calibration backward" + (" + estimates" if estimate else ""))
        r = self.runner
        stats = FisherStats(self.n_positions)
        est_units = [0.0]
        self._flips = (RouterFlips(r, self.seed) if estimate else None) or None  # None: no routers

        def on_batch(i, recs, grads, flip_grads):
            if not estimate:
                return
            for p, g in grads.items():
                if p in self.by_path and f"t:{p}" not in self.store.done:
                    stats.add(p, recs[p], g, flip_grads.get(p) if flip_grads else None)

        def on_block(i, recs):
            H = {p: rec.hessian() for p, rec in recs.items() if rec.hessian() is not None}
            if self.hessians is not None:
                self.hessians.set_block(i, H)
                self.hessians.keep(i, {p: h for p, h in H.items() if p in self.hessians.paths})
            if estimate:
                est_units[0] += self._block_estimates(i, recs, H, stats, len(fwd.references))
                stats.gd.clear(), stats.gf.clear(), stats.rows.clear()
            if self.hessians is not None:
                self.hessians.set_block(None, {})

        res = backward_sweep(r, self.anatomy, fwd, gptq_paths=set(self.by_path), on_batch=on_batch,
                             on_block=on_block, progress=self.progress, flips=self._flips)
        self._embed_flip = res.embed_flip_grads
        nb = len(fwd.references)
        self._head_fisher = res.head_fisher
        self.block_seconds["calibration backward"] = [round(x, 3) for x in res.block_seconds]
        # the head's cotangent: one projection for the softmax, one for the product with the weight
        self._done("calibration backward" + (" + estimates" if estimate else ""),
                   res.block_forwards + nb * 2 * self.head_units + est_units[0])
        return res.embed_grads

    def _block_estimates(self, i: int, recs: dict, H: dict, stats: FisherStats, nb: int) -> float:
        """Every (tensor, format) estimate of block i, stored in order; the tensors side by side on the
        cores (`thread_map`: a GPTQ solve and its estimates run in one thread, numpy's and mlx's element-wise
        work on one core each). Returns the estimates' cost in block forwards."""
        import mlx.core as mx

        r = self.runner
        stored = r.stored(r.layer_prefix(i), r.layers[i])
        block_params = sum(self.by_path[p].params for p in recs if p in self.by_path)
        todo = [p for p in recs if p in self.by_path and f"t:{p}" not in self.store.done and p in H]
        # what the estimates read, evaluated here: a worker thread cannot evaluate this thread's graphs
        mx.eval([stored[p] for p in todo], [x for rows in stats.rows.values() for x in rows],
                [a for h in H.values() for a in hessian_arrays(h)])

        def one(p):
            t = self.by_path[p]
            fmts = self._pairs(t)
            near = near_formats(t.shape, fmts, self.target, self.source_dtypes.get(p, t.dtype))
            w32, made = [], threading.Lock()   # made at the first estimate, after the GPTQ solve (its peak)

            def est(q, cheap=False):
                if len(t.shape) == 3:   # routed experts: their error made a few experts at a time
                    return stats.parts(p, H[p], lambda e0, e1: stored[p][e0:e1].astype(mx.float32) -
                                       q.rows(e0, e1, mx.float32), cheap=cheap)
                with made:   # the round-to-nearest estimates may run in threads of their own
                    if not w32:
                        w32.append(stored[p].astype(mx.float32))
                        mx.eval(w32[0])
                return stats.parts(p, H[p], w32[0] - q.full(mx.float32), cheap=cheap)

            return rounded_estimates(self.rounding, p, stored[p], fmts, near, est,
                                     cheap=lambda q: est(q, cheap=True)), len(near)

        units = 0.0
        work = max((gptq_work_bytes(self.by_path[p].shape) for p in todo), default=0)
        for p, (parts, n_near) in zip(todo, thread_map(one, todo, item_bytes=work)):
            t = self.by_path[p]
            flip = {f: _round(self._flips.cost(t.layer, v[1], self.n_positions)) if self._flips else 0.0
                    for f, v in parts.items()}
            costs = {f: _round(v[0] + flip[f]) for f, v in parts.items()}
            self.store.add({"id": f"t:{p}", "path": p, "estimates": costs,
                            **({"flips": flip} if self._flips else {})})
            # the estimate's matmul against a block forward: in/rows of the layer's own forward
            reach = min(1.0, t.shape[-1] / max(1, self.n_positions))
            units += 2 * n_near * t.params / max(1, block_params) * nb * reach
        return units

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

    def exact_blocks(self, fwd) -> None:
        """The exact method: every (block tensor | embedding, format) pair measured, one sweep per block
        (its pairs as streams beside the float model, at most `max_streams` at a time)."""
        nb = len(fwd.references)
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
            calib["positions"] = {"compared": self.compared, "of": self.n_positions}   # sample_positions
            head_rec = self.store.done.get(f"t:{self.runner.head_path}", {})
            if "head_fit" in head_rec:  # the head role's own factor, already applied to its costs
                calib["head"] = head_rec["head_fit"]
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
            **({"router_flips": self._flips.summary()} if self._flips else {}),
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
