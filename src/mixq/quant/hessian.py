"""Second moments GPTQ rounds against, collected from one float pass over the calibration windows.

  Linear (and lm_head)   H = sum x x^T over every input row the layer sees
  SwitchLinear experts   one H per expert, from the rows routed to it
  Embedding              H = Fisher of the embedding output: E[g g^T] with g the gradient of the
                         log-likelihood of labels *sampled from the model* at every position (cross terms
                         between positions vanish in expectation, so one backward per batch suffices);
                         the rows of a lookup table have no input to take a second moment of
  tied embedding         both roles: trace-normalised Fisher + trace-normalised Gram of the final hidden

Inputs are recorded by swapping each layer for a thin wrapper module of our own for the duration of the
pass (mlx-lm's code is untouched). Block Hessians are computed lazily, one block at a time (`Hessians`).
"""

from __future__ import annotations

import numpy as np

from mixq.core.anatomy import Anatomy
from mixq.core.forward import BlockRunner

FISHER_SAMPLES = 1  # label draws per calibration batch (mlx RNG keyed by the seed)


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
                rows, ids = np.array(xb.astype(mx.float32)), np.array(ib)
                if self._gram is None:  # float32: a large MoE layer holds experts x d x d of these
                    self._gram = np.zeros((self._experts, d, d), dtype=np.float32)
                for e in np.unique(ids):
                    r = rows[ids == e]
                    self._gram[e] += r.T @ r
            return self.inner(x, *args, **kwargs)

    return Recorder


def _fisher(runner: BlockRunner, x, key, samples: int) -> np.ndarray:
    import mlx.core as mx

    h0 = runner.embed(x)
    logits = runner.run(h=h0).astype(mx.float32)
    d = h0.shape[-1]
    H = np.zeros((d, d))
    for _ in range(samples):
        key, sub = mx.random.split(key)
        labels = mx.random.categorical(logits, key=sub)  # drawn from the model itself: the true Fisher

        def loglik(h):
            lg = runner.run(h=h)
            lp = lg - mx.logsumexp(lg, axis=-1, keepdims=True)
            return mx.take_along_axis(lp, labels[..., None], axis=-1).sum()

        g = np.array(mx.grad(loglik)(h0).astype(mx.float32), dtype=np.float64).reshape(-1, d)
        H += g.T @ g
    return H


class Hessians:
    """H for every weight path GPTQ can round (Linear, SwitchLinear, Embedding), as a read-only mapping.

    One float pass over the calibration windows caches every block's input; a block's Hessians are then
    computed when first asked for by re-running just that block with recorders, and only the most recent
    block's are kept. Memory stays at one block's worth of H (a 9B model's down_proj alone is ~1 GB of
    float32 H) plus the cached block inputs; callers walk tensors in block order, so each block is
    computed about once per walk. Tensors outside the blocks (lm_head, embeddings) are computed up front.
    """

    def __init__(self, model, anatomy: Anatomy, tokens, paths: list[str], *, batch_size: int = 8,
                 fisher_samples: int = FISHER_SAMPLES, seed: int = 0, progress: bool = True):
        import mlx.core as mx
        from tqdm import tqdm

        self.model = model
        self.runner = runner = BlockRunner(model, check=False)
        by_path = {t.path: t for t in anatomy.tensors}
        self._linear: dict[str, tuple[str, int | None, int | None]] = {}  # path -> (module, experts, layer)
        self._shapes: dict[str, tuple] = {}
        embeds = []
        for p in paths:
            t = by_path[p]
            if not p.endswith(".weight"):
                continue
            if t.module_type in ("Linear", "SwitchLinear"):
                experts = t.shape[0] if t.module_type == "SwitchLinear" else None
                self._linear[p] = (t.module, experts, t.layer)
                self._shapes[p] = (experts, t.shape[-1], t.shape[-1]) if experts else (t.shape[-1],) * 2
            elif t.module_type == "Embedding":
                embeds.append(p)
        self._paths = [p for p in paths if p in self._linear or p in embeds]
        blocks = {layer for _, _, layer in self._linear.values() if layer is not None}
        outside = {p: v for p, v in self._linear.items() if v[2] is None}

        self._inputs: dict[int, list] = {i: [] for i in blocks}
        self._global: dict[str, np.ndarray] = {}
        tied_gram = None
        starts = list(range(0, tokens.shape[0], batch_size))
        with _recording(model, outside) as recorders:
            for s in tqdm(starts, desc="hessians", disable=not progress, leave=False):
                h = runner.embed(tokens[s:s + batch_size])
                for i in range(runner.num_blocks):
                    if i in self._inputs:
                        self._inputs[i].append(h)
                    h = runner.block(i, h)
                    mx.eval(h)
                hn = runner.norm(h)
                runner.project(hn)  # feeds an untied lm_head's recorder
                if runner.tied and embeds:
                    rows = np.array(hn.astype(mx.float32), dtype=np.float64).reshape(-1, hn.shape[-1])
                    tied_gram = rows.T @ rows + (0 if tied_gram is None else tied_gram)
        self._global.update(recorders)
        if embeds:
            # gradients flow through the real layers (no recorders are in place now)
            key = mx.random.key(seed)
            fisher = None
            for s in tqdm(starts, desc="fisher", disable=not progress, leave=False):
                key, sub = mx.random.split(key)
                f = _fisher(runner, tokens[s:s + batch_size], sub, fisher_samples)
                fisher = f if fisher is None else fisher + f
            for p in embeds:
                H = fisher / max(np.trace(fisher), 1e-30)
                if tied_gram is not None:
                    H = H + tied_gram / max(np.trace(tied_gram), 1e-30)
                self._global[p] = H.astype(np.float32)
        self._block: tuple[int | None, dict] = (None, {})
        self.blocks_computed = 0

    def _compute_block(self, i: int) -> dict:
        import mlx.core as mx

        members = {p: v for p, v in self._linear.items() if v[2] == i}
        with _recording(self.model, members) as grams:
            for h in self._inputs[i]:
                mx.eval(self.runner.block(i, h))
        self.blocks_computed += 1
        return grams

    def __getitem__(self, path: str) -> np.ndarray:
        if path in self._global:
            return self._global[path]
        if path not in self._linear:
            raise KeyError(path)
        i = self._linear[path][2]
        if i is not None and self._block[0] != i:
            self._block = (None, {})  # free the previous block's before computing the next
            self._block = (i, self._compute_block(i))
        got = self._block[1].get(path) if i is not None else None
        # a layer the calibration text never reached: no data, so GPTQ reduces to plain rounding
        return got if got is not None else np.zeros(self._shapes[path], dtype=np.float32)

    def __contains__(self, path) -> bool:
        return path in self._global or path in self._linear

    def __iter__(self):
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def keys(self):
        return list(self._paths)

    def items(self):
        for p in self._paths:
            yield p, self[p]


class _recording:
    """Context: the Linear/SwitchLinear modules of `members` (path -> (module, experts, layer)) wrapped by
    recorders; yields a dict that holds path -> float32 H once the context exits (layers that saw no
    input are left out)."""

    def __init__(self, model, members: dict):
        self.model, self.members, self.grams = model, members, {}

    def __enter__(self) -> dict:
        Recorder = _recorder_class()
        self.originals = {m: _child(self.model, m) for m, _, _ in self.members.values()}
        self.recorders = {p: Recorder(self.originals[m], experts) for p, (m, experts, _) in self.members.items()}
        for p, (m, _, _) in self.members.items():
            _set_child(self.model, m, self.recorders[p])
        return self.grams

    def __exit__(self, *exc) -> None:
        for m, orig in self.originals.items():
            _set_child(self.model, m, orig)
        for p, r in self.recorders.items():
            if r._gram is not None:
                self.grams[p] = r._gram.astype(np.float32)


def collect(model, anatomy: Anatomy, tokens, paths: list[str], **kwargs) -> Hessians:
    """The Hessians of the weight `paths` GPTQ can round (see `Hessians`)."""
    return Hessians(model, anatomy, tokens, paths, **kwargs)


def gptq_rounding(model, anatomy: Anatomy, tokens, *, seed: int = 0, fisher_samples: int = FISHER_SAMPLES,
                  progress: bool = True):
    """GPTQ rounding for every tensor the allocator chooses a format for, its settings (part of the
    sensitivity key) taken from the same arguments that built its Hessians."""
    from mixq.quant.gptq import Rounding
    from mixq.quant.sensitivity import candidate_items

    paths = [t.path for t in candidate_items(anatomy)]
    H = collect(model, anatomy, tokens, paths, seed=seed, fisher_samples=fisher_samples, progress=progress)
    return Rounding(H, settings={"hessian": "input-gram; embedding: sampled-label fisher",
                                 "fisher_samples": fisher_samples})
