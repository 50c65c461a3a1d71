"""End-to-end distillation of the written scales and biases against the float model (`--distill`).

GPTQ and the allocation minimise each tensor's error on its own; what reaches the logits is the sum of
those errors carried through every later block. Here the quantized model runs whole on calibration windows
and every affine tensor's per-group scale and bias is tuned (Adam) on the KL from the float model's
next-token distribution, as mlx-lm's DWQ does (the integer codes stay as written), with three differences:
it starts from mixq's arrays (GPTQ, mixed formats), the parameters are relative (scale s0 (1 + a), bias
b0 + c s0: one learning rate fits groups of any magnitude), and windows held aside from the training
windows pick the epoch that is kept (the written values stay when no epoch beats them). Tuned values are cast to the
source dtype before they are measured, so what is kept is what `mlx_lm.load` reads.

Measured (`benchmarks/distill_vs_dwq.py`, the defaults: 128 + 16 windows of 256 tokens, 4 epochs, lr 3e-4):
held-out KL 0.82x / 0.88x the undistilled model's on the demo at 4.53 / 5.5 bpw, 0.85x on demo-moe at 4.53
(at 5.5 no epoch was kept); 0.31-0.43x mlx-lm DWQ's at the same size. Scales and biases are the limit: the
training windows' own KL falls only to ~0.7x with more epochs or windows.

Cost: per training window and epoch a float forward (the targets, computed as needed so nothing of the
vocabulary is stored), a quantized forward and its backward; the step dequantizes every tensor to float32
from its codes (on the CPU several times faster than differentiating mlx's quantized matmul). Memory: the
float model, the codes (a byte a weight), float32 weights and the activations of one batch.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

from mixq.quant.scalebias import ScaleBias, tunable

DISTILL_VERSION = "distill-scale-bias-v1"
LOGITS_BYTES = 1 << 30   # float32 logits (and their softmax temporaries) of one batch, both models


@dataclass
class DistillSettings:
    windows: int = 128      # training windows
    validation: int = 16    # windows held aside: they pick the epoch kept
    epochs: int = 4
    lr: float = 3e-4        # Adam, relative to each group's own scale; linear warm-up then cosine decay
    batch: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.windows < 1 or self.validation < 1 or self.epochs < 0 or self.lr < 0 or self.batch < 1:
            raise ValueError(f"distillation: windows, validation and batch >= 1, epochs and lr >= 0 (got {self})")

    def to_dict(self) -> dict:
        return {"method": DISTILL_VERSION, "windows": self.windows, "validation": self.validation,
                "epochs": self.epochs, "lr": self.lr, "batch": self.batch, "seed": self.seed}


def batch_size(settings: DistillSettings, seq_len: int, vocab: int) -> int:
    """The batch: at most `settings.batch` windows, fewer where both models' logits would pass LOGITS_BYTES."""
    return max(1, min(settings.batch, LOGITS_BYTES // max(1, 4 * 4 * seq_len * vocab)))


def kl_rows(zt, zs):
    """Per position KL(softmax zt || softmax zs), float32."""
    import mlx.core as mx

    lp = zt - mx.logsumexp(zt, axis=-1, keepdims=True)
    lq = zs - mx.logsumexp(zs, axis=-1, keepdims=True)
    return (mx.exp(lp) * (lp - lq)).sum(axis=-1)


@dataclass
class Distiller:
    """`teacher`: the float model (an mlx-lm model in float32); `quantized`: path -> QuantizedWeight as written."""

    teacher: object
    quantized: dict
    settings: DistillSettings = field(default_factory=DistillSettings)
    progress: object = None

    def __post_init__(self):
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        self.student = copy.deepcopy(self.teacher)
        self.teacher.freeze()
        self.student.freeze()
        self.tuned = tunable(self.quantized)
        fixed = [(p, q.full(mx.float32)) for p, q in self.quantized.items() if p not in self.tuned]
        if fixed:   # microscaled formats: run as written, not tuned
            self.student.update(tree_unflatten(fixed))
            mx.eval([a for _, a in fixed])
        self.sb = ScaleBias(self.tuned)

    def _set(self, params, cast: bool) -> None:
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        self.student.update(tree_unflatten(self.sb.weights(params, cast, mx.float32)))

    def _kl(self, params, tokens, bs: int) -> float:
        import mlx.core as mx

        self._set(params, cast=True)
        total, n = 0.0, 0
        for i in range(0, tokens.shape[0], bs):
            x = tokens[i:i + bs]
            k = kl_rows(self.teacher(x), self.student(x)).sum()
            mx.eval(k)
            total, n = total + float(k.item()), n + x.size
        return total / max(1, n)

    def run(self, train, valid) -> tuple[dict, dict]:
        """`train`, `valid`: (n, L) int token windows. Returns path -> QuantizedWeight (tuned, source dtype;
        the written arrays where no epoch beat them) and the record of the run."""
        import mlx.core as mx
        import mlx.optimizers as optim
        import numpy as np

        t0 = time.perf_counter()
        st = self.settings
        train, valid = mx.array(np.asarray(train)), mx.array(np.asarray(valid))
        vocab = int(self.teacher(valid[:1, :2]).shape[-1])
        bs = batch_size(st, int(train.shape[1]), vocab)
        params = self.sb.zeros()
        batches = [(i, min(i + bs, train.shape[0])) for i in range(0, train.shape[0], bs)]
        steps = st.epochs * len(batches)
        warm = max(1, steps // 10)
        lr = optim.join_schedules([optim.linear_schedule(st.lr / warm, st.lr, warm),
                                   optim.cosine_decay(st.lr, max(1, steps))], [warm])
        opt = optim.Adam(learning_rate=lr)

        def loss_fn(params, x, zt):
            self._set(params, cast=False)
            return kl_rows(zt, self.student(x)).mean()

        grad = mx.value_and_grad(loss_fn)
        rng = np.random.default_rng([st.seed, 17])
        start = self._kl(params, valid, bs)
        best, best_params, best_epoch, epochs, done = start, None, 0, [], 0
        for e in range(st.epochs):
            total = 0.0
            for j in rng.permutation(len(batches)):
                a, b = batches[j]
                x = train[a:b]
                zt = mx.stop_gradient(self.teacher(x))
                loss, g = grad(params, x, zt)
                params = opt.apply_gradients(g, params)
                mx.eval(params, opt.state, loss)
                total += float(loss.item()) * (b - a)
                done += 1
                if self.progress is not None:
                    self.progress.update(done, steps, "steps")
            val = self._kl(params, valid, bs)
            epochs.append({"epoch": e + 1, "train_kl": float(f"{total / train.shape[0]:.6g}"),
                           "validation_kl": float(f"{val:.6g}")})
            if val < best:
                best, best_params, best_epoch = val, {p: dict(d) for p, d in params.items()}, e + 1
        kept = best_params is not None
        out = {**self.quantized, **(self.sb.quantized(best_params) if kept else {})}
        n_train, n_valid = int(train.shape[0]), int(valid.shape[0])
        record = {
            **st.to_dict(), "batch": bs, "tensors": sorted(self.tuned), "steps": steps,
            "validation_kl_before": float(f"{start:.6g}"), "validation_kl_after": float(f"{best:.6g}"),
            "kept": kept, "epoch_kept": best_epoch,
            "epochs_run": epochs,
            # whole-model forwards over one window: a float forward, a quantized forward and its backward
            # (two) per training window and epoch; both models on the validation windows before and per epoch
            "window_forwards": 4 * n_train * st.epochs + 2 * n_valid * (st.epochs + 1),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        return out, record
