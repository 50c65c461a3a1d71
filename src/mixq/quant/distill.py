"""End-to-end distillation of the written scales and biases against the float model (`--distill`).

GPTQ and the allocation minimise each tensor's error on its own; what reaches the logits is the sum of
those errors carried through every later block. Here the quantized model runs whole on calibration windows
and every affine tensor's per-group scale and bias is tuned (Adam) on the KL from the float model's
next-token distribution, as mlx-lm's DWQ does (the integer codes stay as written), with three differences:
it starts from mixq's arrays (GPTQ, mixed formats), the parameters are relative (scale s0 (1 + 2^(4 - bits) a),
bias b0 + c s0: one learning rate fits groups of any magnitude and tensors of any width, `scalebias`), and
windows held aside from the training windows pick the epoch that is kept (the written values stay when no
epoch beats them). Tuned values are cast to the source dtype before they are measured, so what is kept is what
`mlx_lm.load` reads; only tensors whose stored values moved are recorded and patched.

The float model's targets are computed once, before training: per position its top TOP_K log-probabilities,
their ids and the mass left outside them (as DWQ stores its top-1024 logits). The loss is the KL between the
two distributions over those k ids plus one bucket for the rest of the vocabulary: a lower bound of the full KL,
equal to it when the float model's tail is empty. In a convert they come from the convert's own block runner
(`streamed_targets`: every window through one block before the next, so a streamed model is never whole in
memory). The student is then either the float model, lazily loaded, with its quantized tensors' weights
dequantized from the codes at every step ("float"), or the written model running mlx's quantized kernels
("quantized"); preflight picks the float one where it fits (`--distill-student`).

Measured (`benchmarks/distill_vs_dwq.py`, the defaults: 128 + 16 windows of 256 tokens, 4 epochs, lr 3e-4):
see README ("--distill"). Scales and biases are the limit: the training windows' own KL falls only to ~0.7x
with more epochs or windows. Learned rounding offsets fitted end to end as well (AutoRound's sign steps, from
GPTQ's unrounded values) lost on held-out text: demo at 4.53 bpw, 4 epochs, 0.85x the written model's KL
with 79k codes moved (step 0.002), 2.1x with 220k (step 0.01), against 0.81x for scales and biases alone.

Resumable: the targets and each finished epoch are kept in the convert's work dir (`mixq.quant.distill_state`).

Cost: one float forward per window for the targets; per training window and epoch a student forward and its
backward. The float student is several times faster on a CPU (float32 GEMMs against mlx's CPU quantized matmul:
2.0 vs 12.1 s a step of 8 x 256 tokens on the demo, the same loss and gradients); it holds the weights in
float32 and the codes (5 bytes a parameter). The quantized student holds the written arrays (about the
written size). Both hold the tuned state (parameters, gradients and Adam's moments: 8 float32 a group, and
the best epoch's values in the source dtype), the targets (8 bytes x TOP_K a position) and one batch's
activations. The float student makes every tensor's values (scale, bias: 2 float32 a group more) for a step;
the quantized one makes each layer's inside that layer's run (`_layer_with_values`), one layer's at a time.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace

from mixq.core.forward import layer_container, layer_proxy
from mixq.quant.distill_state import DistillState, state_key
from mixq.quant.scalebias import ScaleBias, tunable

DISTILL_VERSION = "distill-scale-bias-v3"
LOGITS_BYTES = 1 << 30   # float32 logits (and their softmax temporaries) of one batch
TOP_K = 1024             # the float model's log-probabilities kept per position (DWQ keeps 1024 logits)
TINY = 1e-30
STUDENTS = ("float", "quantized")


@dataclass
class DistillSettings:
    windows: int = 128      # training windows
    validation: int = 16    # windows held aside: they pick the epoch kept
    epochs: int = 4
    lr: float = 3e-4        # Adam, relative to each group's own scale; linear warm-up then cosine decay
    batch: int = 8
    seed: int = 0
    top_k: int = TOP_K      # float model's log-probabilities kept per position
    student: str = "float"  # how the quantized model runs while it learns (Distiller; preflight picks by memory)

    def __post_init__(self):
        if self.student not in STUDENTS:
            raise ValueError(f"distillation: student is one of {', '.join(STUDENTS)} (got {self.student!r})")
        if self.windows < 1 or self.validation < 1 or self.epochs < 0 or self.lr < 0 or self.batch < 1 \
                or self.top_k < 1:
            raise ValueError(f"distillation: windows, validation, batch and top_k >= 1, epochs and lr >= 0 (got {self})")

    def to_dict(self) -> dict:
        return {"method": DISTILL_VERSION, "windows": self.windows, "validation": self.validation,
                "epochs": self.epochs, "lr": self.lr, "batch": self.batch, "seed": self.seed, "top_k": self.top_k,
                "student": self.student}


def batch_size(settings: DistillSettings, seq_len: int, vocab: int) -> int:
    """The batch: at most `settings.batch` windows, fewer where the logits (and their temporaries) would pass
    LOGITS_BYTES."""
    return max(1, min(settings.batch, LOGITS_BYTES // max(1, 4 * 4 * seq_len * vocab)))


def _log_rest(lse_k, lse):
    """log(1 - exp(lse_k - lse)): the log-mass outside the k ids, floored at TINY (k = vocabulary: none)."""
    import mlx.core as mx

    return mx.log(mx.maximum(-mx.expm1(lse_k - lse), TINY))


@dataclass
class Targets:
    """The float model's top-k per position: ids (n, L, k) int32, log-probabilities (n, L, k) and the
    log-mass outside them (n, L), float32."""

    ids: object
    logp: object
    rest: object

    def __getitem__(self, sl) -> "Targets":
        return Targets(self.ids[sl], self.logp[sl], self.rest[sl])


def _top(z, k: int) -> tuple:
    """(ids, log-probabilities, log-mass outside them) of the top `k` of logits `z`, evaluated."""
    import mlx.core as mx

    z = z.astype(mx.float32)
    v = z.shape[-1]
    kk = min(k, v)   # the top kk without negating z (a vocabulary-wide copy)
    idx = mx.argpartition(z, kth=v - kk, axis=-1)[..., v - kk:] if kk < v else \
        mx.broadcast_to(mx.arange(kk), z.shape)
    zk = mx.take_along_axis(z, idx, axis=-1)
    lse = mx.logsumexp(z, axis=-1, keepdims=True)
    out = (idx.astype(mx.int32), zk - lse, _log_rest(mx.logsumexp(zk, axis=-1), lse[..., 0]))
    mx.eval(out)
    return out


def _joined(parts: list) -> Targets:
    import mlx.core as mx

    return Targets(*(mx.concatenate([p[j] for p in parts]) for j in range(3)))


def targets(model, tokens, k: int, bs: int, on_batch=None) -> Targets:
    """The float `model`'s top-k targets on (n, L) `tokens`, `bs` windows at a time (`on_batch(windows)`
    after each batch)."""
    parts = []
    for i in range(0, tokens.shape[0], bs):
        parts.append(_top(model(tokens[i:i + bs]), k))
        if on_batch is not None:
            on_batch(parts[-1][0].shape[0])
    return _joined(parts)


def streamed_targets(runner, anatomy, tokens, k: int, bs: int, on_batch=None) -> Targets:
    """The same targets from a `core.forward.BlockRunner`: every window through one float block before the
    next (a streaming runner holds one block, never the model), then the head batch by batch. `on_batch`
    sees the forwards done in window units (fractions while the blocks run)."""
    from mixq.quant.sweep import ForwardSweep

    n = int(tokens.shape[0])
    tick = (lambda done, total, _: on_batch(n / total)) if on_batch is not None else None
    final = ForwardSweep(runner, anatomy, tokens, batch_size=bs, progress=tick).run([], head=False).final
    head, parts = runner.head(), []
    for h in final:
        parts.append(_top(head.logits(runner.norm(h)), k))
    return _joined(parts)


def topk_kl(t: Targets, zs):
    """Per position KL between the float model's distribution and softmax(zs) over the target ids and one
    bucket for the rest of the vocabulary (a lower bound of the full KL; equal when the rest is empty)."""
    import mlx.core as mx

    lse = mx.logsumexp(zs, axis=-1)
    zk = mx.take_along_axis(zs, t.ids, axis=-1)
    lq = zk - lse[..., None]
    q_rest = _log_rest(mx.logsumexp(zk, axis=-1), lse)
    return (mx.exp(t.logp) * (t.logp - lq)).sum(axis=-1) + mx.exp(t.rest) * (t.rest - q_rest)


@dataclass
class Distiller:
    """`model`, by `settings.student`:
    - "float": the float model (an mlx-lm model in float32, lazily loaded is best): its quantized tensors'
      weights are replaced from the written codes at every step (dequantized in float32: on a CPU several
      times faster than differentiating the quantized matmul; 5 bytes a parameter);
    - "quantized": the written model as mlx-lm loads it (floats in float32): its tuned scales and biases are
      set at every step and the quantized kernels run (memory about the written size).
    Either is changed: hand it over. `quantized`: path -> QuantizedWeight as written. `teacher(tokens, k, bs,
    on_batch) -> Targets`: the float model's targets (`streamed_targets` over a runner); None: a float
    `model` gives them itself before it becomes the student."""

    model: object
    quantized: dict
    settings: DistillSettings = field(default_factory=DistillSettings)
    progress: object = None
    teacher: object = None

    def __post_init__(self):
        if self.teacher is None and self.settings.student != "float":
            raise ValueError("a quantized student needs a teacher for its targets")
        self.model.freeze()
        self.tuned = tunable(self.quantized)
        self.sb = ScaleBias(self.tuned, by_bits=True)

    def _become_student(self) -> None:
        """The written arrays in the model: a float student runs the microscaled formats dequantized (not
        tuned; the affine ones are set by `_set` at every step); a quantized one shares the written arrays."""
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        if self.settings.student == "float":
            new = [(p, q.full(mx.float32)) for p, q in self.quantized.items() if p not in self.tuned]
        else:   # the packed codes the QuantizedWeights hold: one copy of them
            new = [(f"{p.rsplit('.', 1)[0]}.{n}", a) for p, q in self.quantized.items() for n, a in q.arrays().items()]
        if new:
            self.model.update(tree_unflatten(new))
            mx.eval([a for _, a in new])

    def _set(self, params, cast: bool, paths=None) -> None:
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        if self.settings.student == "float":
            new = self.sb.weights(params, cast, mx.float32)
        else:
            new = _value_arrays(self.sb.values(params, cast, paths))
        self.model.update(tree_unflatten(new))

    @functools.cached_property
    def _by_layer(self) -> tuple[dict, list]:
        """(layer index -> its tuned paths relative to the layer, the tuned paths outside the layers): the
        model's layout, found once, not at every step."""
        container, _ = layer_container(self.model)
        prefix = next(n for n, m in self.model.named_modules() if m is container) + ".layers."
        inside, outside = {}, []
        for p in self.tuned:
            if p.startswith(prefix):
                i, rel = p[len(prefix):].split(".", 1)
                inside.setdefault(int(i), {})[p] = rel
            else:
                outside.append(p)
        return inside, outside

    def _logits(self, x, params, cast: bool, train: bool):
        """The student's logits with the parameters' values. The quantized student makes each layer's values
        inside that layer's run, so one layer's are held at a time; training, it keeps only each layer's input
        for the backward (the layer runs again there): its activations are a block's, not the model's."""
        if self.settings.student == "float":
            self._set(params, cast)
            return self.model(x)
        inside, outside = self._by_layer
        self._set(params, cast, outside)
        container, _ = layer_container(self.model)
        layers = container.layers
        container.layers = [layer_proxy(layer, functools.partial(
            _layer_with_values, self.sb, inside.get(i, {}), {p: params[p] for p in inside.get(i, {})}, cast, train))
            for i, layer in enumerate(layers)]
        try:
            return self.model(x)
        finally:
            container.layers = layers

    def _tick(self, forwards: float) -> None:
        """Progress in window forwards (the record's unit of cost), with the stage's ETA."""
        self._done += forwards   # fractions while a streamed teacher's blocks run
        if self.progress is not None:
            self.progress.update(round(self._done), self._total, "window forwards")

    def _kl(self, params, tokens, tg: Targets, bs: int) -> float:
        import mlx.core as mx

        total, n = 0.0, 0
        for i in range(0, tokens.shape[0], bs):
            x = tokens[i:i + bs]
            k = topk_kl(tg[i:i + bs], self._logits(x, params, cast=True, train=False)).sum()
            mx.eval(k)
            total, n = total + float(k.item()), n + x.size
            self._tick(x.shape[0])
        return total / max(1, n)

    def _targets(self, state: DistillState, train, valid, bs: int) -> tuple[Targets, Targets]:
        """The float model's targets on both sets of windows: kept from an earlier run with the same key, or
        computed (and kept)."""
        got = state.targets()
        if got is None:
            got = {}
            teach = self.teacher or (lambda x, k, b, on: targets(self.model, x, k, b, on))
            for name, x in (("train", train), ("valid", valid)):
                t = teach(x, self.settings.top_k, bs, self._tick)
                got[name] = {"ids": t.ids, "logp": t.logp, "rest": t.rest}
            state.save_targets(got)
        else:
            self._done += int(train.shape[0] + valid.shape[0])
        return tuple(Targets(**got[n]) for n in ("train", "valid"))

    def _epoch(self, grad, opt, params, rng, batches: list, train, t_train: Targets) -> tuple:
        """One pass over the training windows, batches in a random order -> (params, the windows' mean KL)."""
        import mlx.core as mx

        total = 0.0
        for j in rng.permutation(len(batches)):
            a, b = batches[j]
            loss, g = grad(params, train[a:b], t_train[a:b])
            params = opt.apply_gradients(g, params)
            mx.eval(params, opt.state, loss)
            total += float(loss.item()) * (b - a)
            self._tick(step_forwards(self.settings) * (b - a))
        return params, total / train.shape[0]

    def _moved(self, tuned: dict) -> dict:
        """The tensors of `tuned` (path -> QuantizedWeight) whose source-dtype values differ from the written
        ones (a small step can round back to the written value)."""
        import mlx.core as mx

        return {p: q for p, q in tuned.items()
                if not (mx.array_equal(q.scales, self.tuned[p].scales).item()
                        and mx.array_equal(q.biases, self.tuned[p].biases).item())}

    def run(self, train, valid, state_dir=None) -> tuple[dict, dict]:
        """`train`, `valid`: (n, L) int token windows. Returns path -> QuantizedWeight (tuned, source dtype;
        the written arrays where no epoch beat them) and the record of the run. `state_dir`: where the
        targets and each finished epoch are kept, so an interrupted run resumes (mixq.quant.distill_state)."""
        import mlx.core as mx
        import mlx.optimizers as optim
        import numpy as np

        t0 = time.perf_counter()
        st = self.settings
        train, valid = mx.array(np.asarray(train)), mx.array(np.asarray(valid))
        state = DistillState(state_dir, state_key(st.to_dict(), train, valid, self.tuned))
        vocab = _vocab(self.model)
        bs = batch_size(st, int(train.shape[1]), vocab)
        n_train, n_valid = int(train.shape[0]), int(valid.shape[0])
        self._done, self._total = 0, window_forwards(st, n_train, n_valid)
        t_train, t_valid = self._targets(state, train, valid, bs)
        self._become_student()
        params = self.sb.zeros()
        batches = [(i, min(i + bs, train.shape[0])) for i in range(0, train.shape[0], bs)]
        steps = st.epochs * len(batches)
        warm = max(1, steps // 10)
        lr = optim.join_schedules([optim.linear_schedule(st.lr / warm, st.lr, warm),
                                   optim.cosine_decay(st.lr, max(1, steps))], [warm])
        opt = optim.Adam(learning_rate=lr)

        def loss_fn(params, x, tg):
            return topk_kl(tg, self._logits(x, params, cast=False, train=True)).mean()

        grad = mx.value_and_grad(loss_fn)
        rng = np.random.default_rng([st.seed, 17])
        resumed = state.epoch()
        if resumed is None:
            start = self._kl(params, valid, t_valid, bs)
            best, best_q, best_epoch, epochs = start, None, 0, []
        else:   # the epochs an interrupted run finished: where it stood after the last of them
            rec, arrays = resumed
            params, opt.state = arrays["params"], arrays["opt"]
            best_q = self.sb.with_values(arrays["best"]) if "best" in arrays else None
            start, best, best_epoch, epochs = rec["start"], rec["best"], rec["best_epoch"], rec["epochs"]
            rng.bit_generator.state = rec["rng"]
            self._done = window_forwards(replace(st, epochs=len(epochs)), n_train, n_valid)
        for e in range(len(epochs), st.epochs):
            params, train_kl = self._epoch(grad, opt, params, rng, batches, train, t_train)
            val = self._kl(params, valid, t_valid, bs)
            epochs.append({"epoch": e + 1, "train_kl": float(f"{train_kl:.6g}"), "validation_kl": float(f"{val:.6g}")})
            if val < best:   # the best epoch kept as it will be written: source-dtype values, not parameters
                best, best_q, best_epoch = val, self.sb.quantized(params), e + 1
            kept_values = {p: {"scales": q.scales, "biases": q.biases} for p, q in (best_q or {}).items()}
            state.save_epoch({"start": start, "best": best, "best_epoch": best_epoch, "epochs": epochs,
                              "rng": rng.bit_generator.state},
                             {"params": params, "opt": opt.state, **({"best": kept_values} if best_q else {})})
        kept = best_q is not None
        changed = self._moved(best_q or {})
        out = {**self.quantized, **changed}
        record = {
            **st.to_dict(), "batch": bs, "tensors": sorted(changed), "tuned": len(self.tuned), "steps": steps,
            "validation_kl_before": float(f"{start:.6g}"), "validation_kl_after": float(f"{best:.6g}"),
            "kept": kept, "epoch_kept": best_epoch,
            # how much of the float model's probability its top-k ids hold (validation windows): the KL
            # trained on is the full KL where this is 1
            "target_mass": float(f"{mx.exp(t_valid.logp).sum(axis=-1).mean().item():.6g}"),
            "epochs_run": epochs,
            # whole-model forwards over one window: the float model's once per window (the targets); per
            # training window and epoch `step_forwards` (a forward, its backward, and for the quantized student
            # the checkpointed layers' second forward); on the validation windows before training and per epoch
            "window_forwards": round(self._done),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        return out, record


def _vocab(model) -> int:
    """The output rows (the head's, else the embedding's: tied) from the parameters' shapes: nothing is run or
    read (a lazily loaded student stays unread)."""
    from mlx.utils import tree_flatten

    shapes = {k: v.shape for k, v in tree_flatten(model.parameters())}
    for suffix in ("lm_head.weight", "embeddings.weight", "embed_tokens.weight"):
        got = [s[0] for k, s in shapes.items() if k.endswith(suffix)]
        if got:
            return int(got[0])
    raise ValueError("distillation: no head or embedding among the model's parameters")


def step_forwards(st: DistillSettings) -> int:
    """Window forwards a training window costs: a forward and its backward (two), and for the quantized
    student the layers' second forward inside the backward (checkpointed)."""
    return 3 + (st.student == "quantized")


def window_forwards(st: DistillSettings, n_train: int, n_valid: int) -> int:
    """Whole-model forwards over one window a run costs (a backward counted as two)."""
    return n_train + n_valid + step_forwards(st) * n_train * st.epochs + n_valid * (st.epochs + 1)


def _value_arrays(values: dict, names: dict | None = None) -> list:
    """(module path, array) for path -> (scale, bias); `names`: path -> the name to use for it instead."""
    out = []
    for p, (s, b) in values.items():
        module = (names[p] if names else p).rsplit(".", 1)[0]
        out += [(f"{module}.scales", s), (f"{module}.biases", b)]
    return out


def _layer_with_values(sb: ScaleBias, names: dict, params: dict, cast: bool, train: bool, layer, x, *args,
                       **kwargs):
    """`layer(x, ...)` of the quantized student with its tuned tensors' values made from `params` (path ->
    {"a", "c"}; `names`: path -> name inside the layer) for this run only: the layer gets its written arrays
    back after, so no layer's values outlive it. `train`: checkpointed, only the input and the parameters kept
    for the backward (the layer and its values are made again there); the layer's other arrays are constants."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    # what `_become_student` put in the layer: the written arrays
    own = _value_arrays({p: (sb.qs[p].scales, sb.qs[p].biases) for p in names}, names)

    def run(ps, h):
        layer.update(tree_unflatten(_value_arrays(sb.values(ps, cast, list(ps)), names)))
        try:
            return layer(h, *args, **kwargs)
        finally:
            layer.update(tree_unflatten(own))

    return mx.checkpoint(run)(params, x) if train else run(params, x)
