"""The backward sweep: gradients of the sampled-label log-likelihood, block by block in reverse.

Labels are drawn from the float model itself at every position (the forward sweep does it), so the second
moments of these gradients are the Fisher information of the model's own distribution, which is the
Hessian of the KL divergence at the float weights. Starting from the head, each block is made resident
once, and for every batch its vector-Jacobian product is taken from the block's stored input (the forward
sweep kept them) and the cotangent coming from the block above. Every Linear / SwitchLinear of the block is
wrapped by a recorder whose zero "probe" is added to its output: the gradient with respect to the probe
is the gradient with respect to the layer's output, per position, next to the layer's input; the
recorders also accumulate the input second moments GPTQ rounds against.

`on_batch(i, recorders, grads, flip_grads)` sees each batch's per-position inputs and output gradients
(`flip_grads`: the same for the routers' margin cotangent of `mixq.quant.flips`, or None);
`on_block(i, recorders)` runs once the block's batches are done (the block is still resident: rounding
and estimates happen there). The gradient reaching the embedding output is returned per batch (the
embedding's Fisher). Cost: one block forward + one backward (counted as two forwards) per block and batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mixq.core.lanes import batch_bytes, lane_iter
from mixq.quant.hessian import block_members, recording


@dataclass
class BackwardResult:
    embed_grads: list      # per batch: d loglik / d (embedding output), (b, L, d) float32
    embed_flip_grads: list  # per batch: the margin cotangent at the embedding output, or None
    head_fisher: object    # (vocab,) sum over positions of p (1 - p) per head row (the head's Fisher diagonal)
    block_forwards: float
    seconds: float
    block_seconds: list    # per block (index order), estimates included


def head_cotangents(runner, fwd) -> tuple:
    """Per batch: d loglik(sampled labels) / d (final hidden before the norm); and the head's Fisher
    diagonal over all positions (from the same chunks of probabilities)."""
    import mlx.core as mx

    head = runner.head()
    out, fisher = [], []
    for h, ref, labels in zip(fwd.final, fwd.references, fwd.labels):
        g_hn = head.loglik_cotangent(ref.hn, labels, ref.lse, fisher=fisher)
        _, (g,) = mx.vjp(lambda x: runner.norm(x), [h], [g_hn])
        mx.eval(g)
        out.append(g)
    total = fisher[0]
    for f in fisher[1:]:
        total = total + f
    mx.eval(total)
    return out, total


def backward_sweep(runner, anatomy, fwd, *, gptq_paths, on_batch=None, on_block=None,
                   progress=None, flips=None) -> BackwardResult:
    """`flips` (a `mixq.quant.flips.RouterFlips`, with routers): its margin cotangent is carried down
    beside the sampled-label one (a second vector-Jacobian product per block below the last router)."""
    import mlx.core as mx

    t0 = time.perf_counter()
    n = runner.num_blocks
    grads, head_fisher = head_cotangents(runner, fwd)
    bf = 0.0
    block_seconds = [0.0] * n
    # a batch's temporaries for the lanes: a backward holds the forward's too, twice a forward's
    item = (4 if flips else 2) * batch_bytes(anatomy, grads[0].shape) if grads else 0
    for i in reversed(range(n)):
        tb = time.perf_counter()
        members = block_members(anatomy, i, gptq_paths)
        with runner.resident(i), recording(runner.model, members) as recs:
            order = list(recs)
            shapes: dict = {}

            def vjp(b, i=i, recs=recs, order=order, shapes=shapes):
                h_in, g_out = fwd.inputs[i][b], grads[b]
                if h_in.shape not in shapes:  # probe shapes: the graph built, never run (mlx infers shapes)
                    for r in recs.values():
                        r.paused = True
                    runner.block(i, h_in)
                    shapes[h_in.shape] = [recs[p].out_shape for p in order]
                    for r in recs.values():
                        r.paused = False

                def f(h, *probes):
                    for p, z in zip(order, probes):
                        recs[p].probe = z
                    return runner.block(i, h)

                zeros = [mx.zeros(s, dtype=h_in.dtype) for s in shapes[h_in.shape]]
                _, vjps = mx.vjp(f, [h_in, *zeros], [g_out])
                for r in recs.values():
                    r.probe = None
                # this batch's inputs (computed with it), put back on the recorders for its on_batch
                seen = {p: (recs[p].last_input, getattr(recs[p], "last_indices", None)) for p in order}
                return vjps, seen, (flips.block_graph(i, b, h_in, g_out, f, zeros, recs) if flips else None)

            # each batch's graph built, then the batches evaluated side by side on the CPU (mixq.core.lanes)
            for b, (vjps, seen, extra) in lane_iter(vjp, list(range(len(grads))), item_bytes=item):
                grads[b] = vjps[0]
                bf += 3
                fgrads, units = flips.take(i, b, extra, order) if extra is not None else (None, 0)
                bf += units
                if on_batch:
                    for p, (x, idx) in seen.items():
                        recs[p].last_input, recs[p].last_indices = x, idx
                    on_batch(i, recs, dict(zip(order, vjps[1:])), fgrads)
        if on_block:  # after the block's float copy is let go: what it does (GPTQ) needs the room
            on_block(i, recs)
        fwd.inputs[i] = None  # this block's inputs are no longer needed
        block_seconds[i] = time.perf_counter() - tb
        if progress:
            progress(n - i, n, "blocks")
    embed_flip = [flips.cot.get(b) for b in range(len(grads))] if flips else [None] * len(grads)
    return BackwardResult(embed_grads=grads, embed_flip_grads=embed_flip, head_fisher=head_fisher,
                          block_forwards=bf, seconds=time.perf_counter() - t0, block_seconds=block_seconds)
