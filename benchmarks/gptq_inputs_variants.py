"""What GPTQ's own-input rounding (`mixq.quant.asymmetric`) gains from each of its parts, outside the pipeline.

A Nemotron-H model (float32), a uniform BITS:GROUP on every block Linear (and, with --head, the head; the
embedding stays float), rounded block after block three ways:
  float   GPTQ of W against the float model's inputs, H = X X^T (mixq's --gptq-inputs float)
  quant   GPTQ of W against the quantized model's inputs, H~ = X~ X~^T (the original GPTQ's sequential inputs)
  asym    GPTQ of the target W' = (W C + l W)(H~ + l I)^-1, C = X X~^T, against H~ (--gptq-inputs quantized)
`--sequential`: within a block the layers in call order, each group's X~ with the groups before it rounded
(what mixq does); otherwise every layer of a block sees the stream's block input through the float block.
Prints held-out KL (16 x 256 tokens) per variant and the ratio to the first.

Usage: python benchmarks/gptq_inputs_variants.py [--model demo] [--format 4:64] [--windows 64]
       [--ridge 2.0 [--fixed-ridge]] [--sequential] [--head] [--variants float,quant,asym]
"""

from __future__ import annotations

import argparse
import time

import mixq  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm import load
from mlx_lm.models.base import create_attention_mask, create_ssm_mask

from mixq.core.formats import Format
from mixq.core.modelio import resolve_model
from mixq.quant import calibration
from mixq.quant.asymmetric import RIDGE, target
from mixq.quant.gptq import gptq_2d

GROUPS = {"M": [["mixer.in_proj"], ["mixer.out_proj"]],
          "*": [["mixer.q_proj", "mixer.k_proj", "mixer.v_proj"], ["mixer.o_proj"]],
          "-": [["mixer.up_proj"], ["mixer.down_proj"]],
          "E": [["mixer.shared_experts.up_proj"], ["mixer.shared_experts.down_proj"]]}


class Tap(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin, self.x = lin, None

    def __call__(self, x):
        self.x = x.reshape(-1, x.shape[-1])
        return self.lin(x)


def get(mod, path):
    for p in path.split("."):
        mod = getattr(mod, p)
    return mod


def put(mod, path, v):
    *head, last = path.split(".")
    for p in head:
        mod = getattr(mod, p)
    setattr(mod, last, v)


def run_layer(layer, h):
    if layer.block_type == "*":
        return layer(h, mask=create_attention_mask(h, None), cache=None)
    if layer.block_type == "M":
        return layer(h, mask=create_ssm_mask(h, None), cache=None)
    return layer(h)


def rounded(W, H, fmt):
    q, S, B = gptq_2d(W, np.array(H), fmt.bits, fmt.group_size, "float32")
    rows, cols = W.shape
    g = fmt.group_size
    return mx.array((q.astype(np.float32).reshape(rows, cols // g, g) * S[..., None] + B[..., None]).reshape(rows, cols))


def solve(variant, W, Hf, Hq, C, fmt, ridge, rows):
    if variant == "float":
        return rounded(W, Hf, fmt)
    if variant == "quant":
        return rounded(W, Hq, fmt)
    # rows None (--fixed-ridge): l = ridge x mean(diag H~), the first form, whatever the rows
    return rounded(target(W, C, Hq, rows or int(W.shape[-1]), ridge), Hq, fmt)


def quantize(model, batches, variant, args, fmt):
    """Path -> dequantized weight, the blocks rounded in order, the stream carrying its own hidden states."""
    bb = model.backbone
    hf = [bb.embeddings(t) for t in batches]
    hq = list(hf)
    new = {}
    for li, layer in enumerate(bb.layers):
        names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        taps = {n: Tap(get(layer, n)) for n in names}
        for n, t in taps.items():
            put(layer, n, t)
        xf, nxt = [], []
        for h in hf:   # the float block: its output and each layer's input
            nxt.append(run_layer(layer, h))
            xf.append({n: taps[n].x for n in names})
            mx.eval(nxt[-1], list(xf[-1].values()))
        order = GROUPS.get(layer.block_type, [names]) if args.sequential else [names]
        for group in order:
            group = [n for n in group if n in taps]
            Hf = {n: sum(x[n].T @ x[n] for x in xf) for n in group}
            Hq, C = {n: 0 for n in group}, {n: 0 for n in group}
            for k, h in enumerate(hq):   # the stream, with the groups before this one rounded
                run_layer(layer, h)
                for n in group:
                    x = taps[n].x
                    Hq[n], C[n] = Hq[n] + x.T @ x, C[n] + xf[k][n].T @ x
                mx.eval(list(Hq.values()), list(C.values()))
            rows = sum(x[group[0]].shape[0] for x in xf) if not args.fixed_ridge else None
            for n in group:
                new[(li, n)] = solve(variant, taps[n].lin.weight, Hf[n], Hq[n], C[n], fmt, args.ridge, rows)
                taps[n].lin.weight, new[(li, n, "float")] = new[(li, n)], taps[n].lin.weight
        hq = [run_layer(layer, h) for h in hq]
        mx.eval(hq)
        for n in names:   # the float weights back, the taps off
            put(layer, n, taps[n].lin)
            get(layer, n).weight = new.pop((li, n, "float"))
        hf = nxt
    if args.head:
        xf = [bb.norm_f(h).reshape(-1, h.shape[-1]) for h in hf]
        xq = [bb.norm_f(h).reshape(-1, h.shape[-1]) for h in hq]
        Hf, Hq = sum(x.T @ x for x in xf), sum(x.T @ x for x in xq)
        C = sum(a.T @ b for a, b in zip(xf, xq))
        rows = sum(x.shape[0] for x in xq) if not args.fixed_ridge else None
        new[("head", "")] = solve(variant, model.lm_head.weight, Hf, Hq, C, fmt, args.ridge, rows)
    return new


def heldout_kl(model, batches, new) -> float:
    refs = []
    for t in batches:
        refs.append(model(t))
        mx.eval(refs[-1])
    mods = {k: model.lm_head if k[0] == "head" else get(model.backbone.layers[k[0]], k[1]) for k in new}
    orig = {k: m.weight for k, m in mods.items()}
    for k, m in mods.items():
        m.weight = new[k]
    kls = []
    for t, r in zip(batches, refs):
        lp, lq = (z - mx.logsumexp(z, axis=-1, keepdims=True) for z in (r, model(t)))
        kls.append(mx.sum(mx.exp(lp) * (lp - lq), axis=-1).reshape(-1))
    for k, m in mods.items():
        m.weight = orig[k]
    return float(mx.mean(mx.concatenate(kls)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--format", default="4:64")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--ridge", type=float, default=RIDGE, help="l = RIDGE x inputs / rows x mean(diag H~)")
    ap.add_argument("--fixed-ridge", action="store_true", help="l = RIDGE x mean(diag H~) (the first form)")
    ap.add_argument("--sequential", action="store_true")
    ap.add_argument("--head", action="store_true")
    ap.add_argument("--variants", default="float,quant,asym")
    args = ap.parse_args()
    fmt = Format.parse(args.format)
    model, tok = load(str(resolve_model(args.model)))
    if model.model_type != "nemotron_h":
        raise SystemExit("a nemotron_h model is needed (its blocks' call order is written out here)")
    model.set_dtype(mx.float32)
    cal = calibration.make_windows(calibration.load_documents(None), tok, n_samples=args.windows, seq_len=256, seed=0)
    held = calibration.heldout_windows(tok, n_samples=16, seq_len=256)
    split = lambda w: [mx.array(np.array(w.tokens)[i:i + 8]) for i in range(0, w.tokens.shape[0], 8)]  # noqa: E731
    res = {}
    for v in args.variants.split(","):
        t0 = time.perf_counter()
        res[v] = heldout_kl(model, split(held), quantize(model, split(cal), v, args, fmt))
        print(f"{v:<6} held-out KL {res[v]:.6f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    first = next(iter(res.values()))
    print(" ".join(f"{v}={kl / first:.3f}" for v, kl in res.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
