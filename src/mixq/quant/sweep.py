"""The forward sweep: every pass that runs the model over token windows, layer by layer.

One sweep walks the blocks in order; each block is made resident in the compute dtype once and every
batch of windows runs through it before the next block (so memory holds one block, never the model). The
float model runs as the "float stream": it provides the reference distribution at the end, the Hessians
GPTQ needs for the block at hand (`grams=True`), and, if asked, every block's input (for the backward
sweep). Any number of quantized *streams* run beside it: a stream is a set of formats (a plan, a uniform
baseline, one tensor at one format); it shares the float stream's hidden states until the first block it
changes, then carries its own. Each stream's tensors are rounded when its block comes (GPTQ against this
sweep's float Hessians, or round-to-nearest) and dropped after.

At the end each stream is compared with the float reference position by position (`Head.compare`): KL,
top-1 agreement, next-token NLL. Sweeps report block-forward equivalents for honest cost accounting.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from mixq.core.formats import Format
from mixq.core.head import compare_many
from mixq.core.lanes import batch_bytes, lane_map, thread_map
from mixq.quant import asymmetric
from mixq.quant.asymmetric import OwnInputs
from mixq.quant.gptq import gptq_work_bytes
from mixq.quant.hessian import HessianMap, block_members, recording
from mixq.quant.qweight import QuantizedWeight, round_weight, round_weights


@dataclass
class Stream:
    """A set of formats run beside the float model. `rounding` None = round-to-nearest (mlx-lm's)."""

    name: str
    formats: dict  # weight path -> Format (float entries ignored)
    rounding: object = None
    # path -> QuantizedWeight given ready instead of rounded here (a written model's tensors, read when
    # their block comes); its keys are the tensors it changes
    quantized: object = None
    # called per block with (block, path -> QuantizedWeight, the stream's inputs, the float block's outputs,
    # the float block's inputs); returns the tensors the stream runs (and writes) instead: `quant.tune.BlockTuner`
    tuner: object = None
    # False: the stream's tensors are only rounded (and handed to on_rounded), never run or compared; a plan
    # written without a measurement costs no forward
    measure: bool = True
    # True: GPTQ rounds the dense layers against this stream's own inputs (`quant.asymmetric`); its rounding
    # reads `asymmetric.OwnInputs`, and the stream runs the Gram windows too
    own_inputs: bool = False
    h: list | None = field(default=None, repr=False)
    hx: list | None = field(default=None, repr=False)   # its hidden states on the Gram windows (own_inputs)

    def __post_init__(self):
        if self.tuner is not None and not self.measure:
            raise ValueError(f"stream {self.name}: a tuned stream runs its blocks (measure=True)")
        if self.own_inputs and (not self.measure or not isinstance(getattr(self.rounding, "hessians", None),
                                                                   OwnInputs)):
            raise ValueError(f"stream {self.name}: rounding against its own inputs needs measure=True and a "
                             "rounding that reads asymmetric.OwnInputs")

    def touched(self) -> set:
        out = {p for p, f in self.formats.items() if f.is_quantized}
        return out | set(self.quantized.keys() if self.quantized is not None else ())


@dataclass
class SweepResult:
    references: list            # per batch: core.head.Reference (float model)
    streams: dict               # name -> {"kl": np, "same": np, "nll": np}
    inputs: list | None         # per block: per batch block input (keep_inputs)
    final: list                 # per batch: float hidden state before the final norm
    labels: list | None         # per batch: labels sampled from the float model (sample_key)
    head_gram: object | None    # sum of hn hn^T (grams=True)
    block_forwards: float = 0.0
    seconds: float = 0.0
    block_seconds: list = field(default_factory=list)  # per block: float stream + every stream's run


def batches_of(tokens, batch_size: int) -> list:
    return [tokens[s:s + batch_size] for s in range(0, tokens.shape[0], batch_size)]


def targets_of(x):
    """Next-token targets aligned with positions; the last position has none (-1)."""
    import mlx.core as mx

    return mx.concatenate([x[:, 1:], mx.full((x.shape[0], 1), -1, dtype=x.dtype)], axis=1)


class ForwardSweep:
    def __init__(self, runner, anatomy, tokens, *, batch_size: int = 8, gptq_paths=(), progress=None,
                 gram_tokens=None):
        """`gram_tokens`: more windows the float blocks run on only for the Grams (grams=True): the dense
        layers' (and the untied head's) second moments are taken over them and `tokens` together, the routed
        experts' over `tokens` only; nothing is compared or measured on them."""
        self.runner, self.anatomy = runner, anatomy
        self.batches = batches_of(tokens, batch_size)
        self.gram_batches = batches_of(gram_tokens, batch_size) if gram_tokens is not None else []
        self.gptq_paths = set(gptq_paths)
        self.by_layer: dict = {}
        for t in anatomy.tensors:
            self.by_layer.setdefault(t.layer, []).append(t.path)
        self.progress = progress  # callable(done, total, what) or None

    def _start(self, stream: Stream) -> int:
        """First block the stream changes: -1 embedding, num_blocks = only the head."""
        r = self.runner
        touched = stream.touched()
        if f"{r.embed_path}.weight" in touched:
            return -1
        layers = [t.layer for t in self.anatomy.tensors if t.path in touched and t.layer is not None]
        return min(layers) if layers else r.num_blocks

    def _rounded(self, stream: Stream, path: str, stored: dict) -> QuantizedWeight | None:
        if stream.quantized is not None and path in stream.quantized.keys():
            return stream.quantized[path]
        f = stream.formats.get(path)
        if f is None or not f.is_quantized:
            return None
        return round_weight(stream.rounding, path, stored[path], f)

    def _solve_block(self, i: int, active: list, stored: dict) -> dict:
        """Every format the active streams need for block i's tensors, solved once per tensor and rounding
        (GPTQ formats of one tensor together): (path, format, id(rounding)) -> QuantizedWeight."""
        import mlx.core as mx

        jobs = []   # (path, rounding, formats): solved side by side on the cores (`thread_map`)
        for p in self.by_layer.get(i, []):
            wanted: dict = {}
            for s in active:
                f = s.formats.get(p)
                if (s.quantized is not None and p in s.quantized.keys()) or f is None or not f.is_quantized:
                    continue
                wanted.setdefault(id(s.rounding), (s.rounding, {}))[1][str(f)] = f
            jobs += [(p, rounding, list(fmts.values())) for rounding, fmts in wanted.values()]
        for p, rounding, fmts in jobs:   # evaluated here: a worker thread cannot evaluate this thread's graphs
            if rounding is not None and any(rounding.uses_gptq(p, f) for f in fmts):
                rounding.ready(p)
        mx.eval([stored[p] for p, _, _ in jobs])
        work = max((gptq_work_bytes(stored[p].shape, len(f)) for p, _, f in jobs), default=0)
        out = {}
        for (p, rounding, _), got in zip(jobs, thread_map(lambda j: round_weights(j[1], j[0], stored[j[0]], j[2]),
                                                          jobs, item_bytes=work)):
            for name, q in got.items():
                out[(p, name, id(rounding))] = q
        return out

    def _embed(self, streams, starts, on_rounded, gram: bool) -> tuple:
        """The float embedding output per batch (and per Gram window batch, with `gram`), and each stream that
        changes the table started from its rounding (measured streams keep a tied table's rounding for the
        head: stream name -> it). The table is read once for all of them."""
        import mlx.core as mx

        r = self.runner
        table = r.embed_table()
        h = [r.embed(x, table) for x in self.batches]
        hx = [r.embed(x, table) for x in self.gram_batches] if gram else []
        mx.eval(h, hx)
        emb = f"{r.embed_path}.weight"
        emb_q = {}
        for s in streams:
            if starts[s.name] == -1:
                q = self._rounded(s, emb, {emb: table})
                if on_rounded:
                    on_rounded(s, emb, q)
                if s.measure:
                    s.h = [q.take(x, r.compute) for x in self.batches]
                    s.hx = [q.take(x, r.compute) for x in self.gram_batches] if s.own_inputs and gram else []
                    mx.eval(s.h, s.hx)
                if r.tied and s.measure:   # the head reuses it; an untied table's is let go (0.4 GiB at 9B widths)
                    emb_q[s.name] = q
                del q
        return h, hx, emb_q

    def _head_rounding(self, s: Stream, emb_q: dict, on_rounded, finals: list | None = None):
        """The stream's rounded head, or None where it runs the float one: a tied table's rounding as kept
        from the embedding (`emb_q`), otherwise rounded here and handed to `on_rounded`. `finals`: (float,
        stream) final normed states batch for batch, for a stream rounding against its own inputs."""
        r = self.runner
        if r.head_path not in s.touched():
            return None
        q = emb_q.get(s.name)   # held only for a tied head
        f = s.formats.get(r.head_path)
        if q is None and finals and f is not None and s.rounding.uses_gptq(r.head_path, f) and \
                (s.quantized is None or r.head_path not in s.quantized.keys()):
            q = asymmetric.round_head(r, s, f, [a for a, _ in finals], [b for _, b in finals])
            if on_rounded:
                on_rounded(s, r.head_path, q)
        elif q is None:
            q = self._rounded(s, r.head_path, {r.head_path: r.head_weight()})
            if on_rounded:
                on_rounded(s, r.head_path, q)
        return q

    def _gram_run(self, i: int, hx: list, recs: dict, item: int, fn=None) -> list:
        """Block i on the Gram windows, recorded by the dense layers only: a routed expert keeps the
        calibration windows' rows (on the 128-expert 30B-A3B slice at 2 bits, the experts' GPTQ over 64 windows
        measured 1.23-1.24x the held-out KL of 16 windows'; and their rows would grow with every window)."""
        routed = [rec for rec in recs.values() if rec.routed]
        for rec in routed:
            rec.paused = True
        try:
            return lane_map(fn or (lambda x: self.runner.block(i, x)), hx, item_bytes=item)
        finally:
            for rec in routed:
                rec.paused = False

    def _head_gram(self, hn: list, hx: list, hessians):
        """sum hn hn^T over the final normed states, the Gram windows' with them; with Gram windows it is the
        untied head's H (the head is rounded after)."""
        import mlx.core as mx

        r, head_gram = self.runner, None
        for x in itertools.chain(hn, (r.norm(y) for y in hx)):   # one Gram window's normed states at a time
            rows = x.reshape(-1, x.shape[-1])
            head_gram = rows.T @ rows if head_gram is None else head_gram + rows.T @ rows
            mx.eval(head_gram)
        if hx and r.head_path in hessians.paths and not r.tied:
            hessians.global_[r.head_path] = head_gram
        return head_gram

    def _head_stage(self, streams, hn, references, sample_key, emb_q, on_rounded, compare_positions, hx=()):
        """The float reference (unless given) and labels from the final hidden states `hn`, each measured
        stream compared with it through its own head; an untied head rounded for the streams written only.
        `hx`: the float model's final states on the Gram windows (streams rounding against their own inputs)."""
        import mlx.core as mx

        r = self.runner
        for s in streams:
            if not s.measure and not r.tied:   # a tied table went with the embedding
                self._head_rounding(s, emb_q, on_rounded)
        measured = [s for s in streams if s.measure]
        if references is not None and sample_key is None and not measured:
            return references, None, {}
        head = r.head()
        targets = [targets_of(x) for x in self.batches]
        keys = [None] * len(self.batches) if sample_key is None else mx.random.split(sample_key, len(hn))
        if references is None:  # labels drawn from the same chunks of logits as the reference's statistics
            references = [head.reference(x, t, sample_key=k) for x, t, k in zip(hn, targets, keys)]
            labels = [ref.labels for ref in references] if sample_key is not None else None
        else:
            labels = None if sample_key is None else [head.sample(x, k) for x, k in zip(hn, keys)]
        compared = []
        for s in measured:
            s_hn = [r.norm(x) for x in s.h] if s.h is not None else hn if hn is not None else \
                [ref.hn for ref in references]  # never branched off: the float model's own
            finals = None
            if s.own_inputs and s.h is not None and hn is not None:
                finals = list(zip(hn, s_hn)) + [(r.norm(a), r.norm(b)) for a, b in zip(hx, s.hx or [])]
            q = self._head_rounding(s, emb_q, on_rounded, finals)
            s.hx = None
            compared.append((head if q is None else r.head({r.head_path: q}), s_hn))
            s.h = None
        if compare_positions is not None:
            targets = [t.reshape(-1)[idx] for t, idx in zip(targets, compare_positions)]
        per = []
        for b in range(len(self.batches)):
            idx = None if compare_positions is None else compare_positions[b]
            pairs = [(hd, xs[b] if idx is None else xs[b].reshape(-1, xs[b].shape[-1])[idx]) for hd, xs in compared]
            per.append(compare_many(pairs, references[b] if idx is None else references[b].take(idx), head,
                                    targets[b]))
        return references, labels, {s.name: _collect([p[j] for p in per], targets) for j, s in enumerate(measured)}

    @staticmethod
    def _pick(stream: Stream, path: str, solved: dict):
        if stream.quantized is not None and path in stream.quantized.keys():
            return stream.quantized[path]
        f = stream.formats.get(path)
        if f is None or not f.is_quantized:
            return None
        return solved[(path, str(f), id(stream.rounding))]

    def run(self, streams: list[Stream], *, references: list | None = None, grams: bool = False,
            keep_inputs: bool = False, sample_key=None, hessians: HessianMap | None = None,
            on_rounded=None, gram_blocks=None, compare_positions: list | None = None,
            head: bool = True) -> SweepResult:
        """Run the float stream and `streams`; compare each stream with the float reference (computed here
        unless `references` is given). `hessians` receives each block's float Grams (grams=True) before
        the streams of that block are rounded. `on_rounded(stream, path, QuantizedWeight)` sees every
        rounded tensor (the writer). `gram_blocks`: the blocks whose Grams are recorded (default all).
        `compare_positions`: per batch, the flat positions the streams are compared on (`core.head.
        sample_positions`; default all); the references themselves always cover every position. `head=False`:
        the float blocks only (no head, no streams): `final` holds their last hidden states."""
        import mlx.core as mx

        t0 = time.perf_counter()
        r, n = self.runner, self.runner.num_blocks
        starts = {s.name: self._start(s) for s in streams}
        for s in streams:
            s.h = s.hx = None
        # hx: the Gram windows' float hidden states (the Grams then cover them: a kept Gram, over the
        # calibration windows only, is not used)
        h, hx, emb_q = self._embed(streams, starts, on_rounded, gram=grams and hessians is not None)
        inputs = [] if keep_inputs else None
        # the float model runs only for what needs it: the reference, labels, block inputs, streams that
        # branch off later, or Grams not kept from an earlier sweep
        if not head and (streams or references is not None):
            raise ValueError("a sweep without the head runs the float blocks only (no streams, no references)")
        float_run = references is None or keep_inputs or sample_key is not None or \
            any((starts[s.name] > 0 and s.measure) or s.tuner is not None or s.own_inputs for s in streams) or \
            (grams and hessians is not None and (bool(hx) or not hessians.kept_all(range(n))))
        bf = float((len(self.batches) + len(hx)) * n) if float_run else 0.0
        block_seconds = []
        own_only = bool(streams) and all(s.own_inputs for s in streams)
        item = batch_bytes(self.anatomy, h[0].shape) if h else 0   # a batch's temporaries (lanes)
        for i in range(n):
            tb = time.perf_counter()
            kept = hessians.kept(i) if grams and hessians is not None and not hx else None
            record = grams and (gram_blocks is None or i in gram_blocks)
            members = block_members(self.anatomy, i, self.gptq_paths) if record and kept is None else {}
            if own_only:   # the dense layers' float Grams would go unused: the streams take their own inputs'
                members = {p: m for p, m in members.items() if m[1] is not None}
            with r.resident(i):
                if keep_inputs:
                    inputs.append(h)
                h_in, hx_in = h, hx
                # streams fitting GPTQ to their own inputs: the float run keeps each group's input rows
                own_here = float_run and any(s.own_inputs and starts[s.name] <= i for s in streams)
                groups, once = asymmetric.block_groups(self, i, h_in[0]) if own_here else ([], False)
                fx = []
                if float_run:
                    with recording(r.model, members) as recs, \
                            asymmetric.tapped(r.model, [g[0] for g in groups]) as taps:
                        run = asymmetric.capturing(lambda x, i=i: r.block(i, x), taps, groups)
                        h, fx = asymmetric.split(lane_map(run, h_in, item_bytes=item), groups)
                        if hx:
                            hx, fxx = asymmetric.split(self._gram_run(i, hx, recs, item, run), groups)
                            fx = [a + b for a, b in zip(fx, fxx)]
                if hessians is not None and grams:
                    hessians.set_block(i, kept if kept is not None else
                                       {p: rec.hessian() for p, rec in recs.items() if rec.hessian() is not None})
                active = [s for s in streams if starts[s.name] <= i]
                if active and float_run:
                    r.relax(i)   # the float block's compute copies are not held through the rounding
                stored = r.stored(r.layer_prefix(i), r.layers[i]) if active else {}
                plain = [s for s in active if not s.own_inputs]
                solved = self._solve_block(i, plain, stored) if plain else {}
                # the last stream to read the float rows lets them go as its own inputs are kept for feeding
                # (a tuned stream's final run is not fed: its tuning changes what the kept inputs came from)
                last_own = next((s for s in reversed(active) if s.own_inputs), None)
                for s in active:
                    if s.h is None and s.measure:
                        s.h = h_in
                        s.hx = hx_in if s.own_inputs else []
                    fed = {}
                    if s.own_inputs:
                        feed = once and s is last_own and s.tuner is None
                        qs, spent, fed = asymmetric.round_block(self, i, s, groups, fx, s.h + s.hx, stored, item,
                                                                feed=feed)
                        bf += spent
                    else:
                        qs = {p: q for p in self.by_layer.get(i, []) if (q := self._pick(s, p, solved)) is not None}
                    if s.tuner is not None and qs:
                        qs = s.tuner(i, qs, s.h, h, h_in)
                    over = {}
                    for p, q in qs.items():
                        if on_rounded:
                            on_rounded(s, p, q)
                        if s.measure:
                            over[p] = q.full(r.compute)
                    if not s.measure:
                        continue
                    with r.swap(i, over):   # the calibration and the Gram windows' states, one map
                        both = asymmetric.feeding(r, i, s.h + s.hx, fed, item)
                    s.h, s.hx = both[:len(s.h)], both[len(s.h):]
                    del fed, both
                    bf += len(self.batches) + len(s.hx or [])
                fx = None   # the float run's input rows: every stream has fitted this block
            block_seconds.append(time.perf_counter() - tb)
            if self.progress:
                self.progress(i + 1, n, "blocks")
        if hessians is not None:
            hessians.set_block(None, {})
        final = h if float_run else None
        if not head:
            return SweepResult(references=None, streams={}, inputs=inputs, final=final, labels=None, head_gram=None,
                               block_forwards=bf, seconds=time.perf_counter() - t0, block_seconds=block_seconds)
        hn = [r.norm(x) for x in final] if float_run else None
        if hn is not None:
            mx.eval(hn)
        # streams that all fit the head to their own final states read no float Gram of it
        head_gram = self._head_gram(hn, hx, hessians) if grams and float_run and not own_only else None
        references, labels, results = self._head_stage(streams, hn, references, sample_key, emb_q, on_rounded,
                                                       compare_positions, hx)
        return SweepResult(references=references, streams=results, inputs=inputs, final=final, labels=labels,
                           head_gram=head_gram, block_forwards=bf, seconds=time.perf_counter() - t0,
                           block_seconds=block_seconds)


def _collect(per: list, targets: list) -> dict:
    import numpy as np

    kl = np.concatenate([np.array(p["kl"]).ravel() for p in per])
    same = np.concatenate([np.array(p["same"]).ravel() for p in per])
    valid = np.concatenate([np.array(t).ravel() >= 0 for t in targets])
    nll = np.concatenate([np.array(p["nll"]).ravel() for p in per])[valid]
    return {"kl": kl, "same": same, "nll": nll}


def stream_for(name: str, formats: dict, rounding=None) -> Stream:
    return Stream(name=name, formats={p: f for p, f in formats.items() if isinstance(f, Format)},
                  rounding=rounding)
