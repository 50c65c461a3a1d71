"""Second moments GPTQ rounds against, collected from one float pass over the calibration windows.

  Linear (and lm_head)   H = sum x x^T over every input row the layer sees
  SwitchLinear experts   one H per expert, from the rows routed to it
  Embedding              H = Fisher of the embedding output: E[g g^T] with g the gradient of the
                         log-likelihood of labels *sampled from the model* at every position (cross terms
                         between positions vanish in expectation, so one backward per batch suffices);
                         the rows of a lookup table have no input to take a second moment of
  tied embedding         both roles: trace-normalised Fisher + trace-normalised Gram of the final hidden

Inputs are recorded by swapping each layer for a thin wrapper module of our own for the duration of the
pass (mlx-lm's code is untouched). Memory is sum(in_features^2) floats over the measured layers.
"""

from __future__ import annotations

import numpy as np

from mixq.core.anatomy import Anatomy
from mixq.core.forward import BlockRunner

FISHER_SAMPLES = 1  # label draws per calibration batch


def _child(root, path: str):
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part)
    return obj


def _set_child(root, path: str, value) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = _child(root, parent_path) if parent_path else root
    if isinstance(parent, list):
        parent[int(name)] = value
    else:
        setattr(parent, name, value)


def _recorder_class():
    import mlx.core as mx
    import mlx.nn as nn

    class Recorder(nn.Module):
        """Passes through to the wrapped layer, accumulating the second moment of its inputs."""

        def __init__(self, inner, experts: int | None):
            super().__init__()
            self.inner = inner
            self._experts = experts
            self._gram = None

        def __call__(self, x, *args, **kwargs):
            d = x.shape[-1]
            if self._experts is None:
                rows = x.reshape(-1, d).astype(mx.float32)
                g = np.array(rows.T @ rows, dtype=np.float64)
                self._gram = g if self._gram is None else self._gram + g
            else:
                idx = args[0] if args else kwargs["indices"]
                xb = mx.broadcast_to(x, (*idx.shape, *x.shape[-2:])).reshape(-1, d)
                ib = mx.broadcast_to(idx.reshape(*idx.shape, 1), (*idx.shape, x.shape[-2])).reshape(-1)
                rows, ids = np.array(xb.astype(mx.float32), dtype=np.float64), np.array(ib)
                if self._gram is None:
                    self._gram = np.zeros((self._experts, d, d))
                for e in np.unique(ids):
                    r = rows[ids == e]
                    self._gram[e] += r.T @ r
            return self.inner(x, *args, **kwargs)

    return Recorder


def _fisher(runner: BlockRunner, x, rng: np.random.Generator, samples: int) -> np.ndarray:
    import mlx.core as mx

    h0 = runner.embed(x)
    logits = runner.run(h=h0)
    probs = np.array(mx.softmax(logits.astype(mx.float32), axis=-1), dtype=np.float64)
    d = h0.shape[-1]
    H = np.zeros((d, d))
    for _ in range(samples):
        u = rng.random(probs.shape[:-1] + (1,))
        y = np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), probs.shape[-1] - 1)
        labels = mx.array(y.astype(np.int32))

        def loglik(h):
            lg = runner.run(h=h)
            lp = lg - mx.logsumexp(lg, axis=-1, keepdims=True)
            return mx.take_along_axis(lp, labels[..., None], axis=-1).sum()

        g = np.array(mx.grad(loglik)(h0).astype(mx.float32), dtype=np.float64).reshape(-1, d)
        H += g.T @ g
    return H


def collect(model, anatomy: Anatomy, tokens, paths: list[str], *, batch_size: int = 8,
            fisher_samples: int = FISHER_SAMPLES, seed: int = 0, progress: bool = True) -> dict:
    """Hessians (float32 numpy) for the weight `paths` GPTQ can round: Linear, SwitchLinear, Embedding."""
    from tqdm import tqdm

    runner = BlockRunner(model, check=False)
    by_path = {t.path: t for t in anatomy.tensors}
    Recorder = _recorder_class()
    wrapped, fisher_for = {}, []
    for p in paths:
        t = by_path[p]
        if not p.endswith(".weight"):
            continue
        if t.module_type in ("Linear", "SwitchLinear"):
            wrapped[t.module] = (p, t.shape[0] if t.module_type == "SwitchLinear" else None)
        elif t.module_type == "Embedding":
            fisher_for.append(p)

    originals = {m: _child(model, m) for m in wrapped}
    recorders = {m: Recorder(originals[m], experts) for m, (_, experts) in wrapped.items()}
    tied_gram = None
    fisher = None
    rng = np.random.default_rng(seed)
    starts = list(range(0, tokens.shape[0], batch_size))
    try:
        for m, r in recorders.items():
            _set_child(model, m, r)
        for s in tqdm(starts, desc="hessians", disable=not progress, leave=False):
            x = tokens[s:s + batch_size]
            h = runner.embed(x)
            for i in range(runner.num_blocks):
                h = runner.block(i, h)
            hn = runner.norm(h)
            runner.project(hn)
            if runner.tied and fisher_for:
                import mlx.core as mx

                rows = np.array(hn.astype(mx.float32), dtype=np.float64).reshape(-1, hn.shape[-1])
                tied_gram = rows.T @ rows + (0 if tied_gram is None else tied_gram)
        # gradients must flow through the real layers, not through recording wrappers
    finally:
        for m, orig in originals.items():
            _set_child(model, m, orig)
    if fisher_for:
        for s in tqdm(starts, desc="fisher", disable=not progress, leave=False):
            f = _fisher(runner, tokens[s:s + batch_size], rng, fisher_samples)
            fisher = f if fisher is None else fisher + f

    out = {}
    for m, (p, _) in wrapped.items():
        if recorders[m]._gram is not None:
            out[p] = recorders[m]._gram.astype(np.float32)
    for p in fisher_for:
        H = fisher / max(np.trace(fisher), 1e-30)
        if tied_gram is not None:
            H = H + tied_gram / max(np.trace(tied_gram), 1e-30)
        out[p] = H.astype(np.float32)
    return out


def settings(fisher_samples: int = FISHER_SAMPLES) -> dict:
    return {"hessian": "input-gram; embedding: sampled-label fisher", "fisher_samples": fisher_samples}
