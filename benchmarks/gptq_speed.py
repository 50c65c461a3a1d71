"""GPTQ rounding: mixq's mlx float32 solver against the numpy float64 one it replaced (gptq-v2, kept here
only as the reference), on Nemotron-sized tensors with random 4096-token Hessians.

Each (case, implementation) runs in its own process on the same saved inputs; it times a whole
`Rounding.quantized` (factor, solve, round-to-nearest check, pack) and its peak RSS above what the inputs
already hold. The parent then scores both packed results on the H-weighted output error sum d H d^T
(float64), next to mlx's round-to-nearest, and counts the integer codes on which they agree. The whole
131072 x 4480 lm_head runs with the mlx solver only (the reference would need ~20 GB): its peak RSS shows
the row-chunked memory bound.

Usage: python benchmarks/gptq_speed.py [--cases all|small|NAME,...] [--format 4:64] [--tokens 4096] [--new-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import mixq  # noqa: F401  (first: loads a fast BLAS for mlx; numpy imported earlier would hide it)
import numpy as np

# Nemotron-Nano-9B-v2 (hidden 4480, MLP 15680, lm_head 131072 rows) and Nemotron-3-Nano-30B-A3B experts
CASES = {
    "small": ((512, 1024), 0),
    "o_proj 4480x4480": ((4480, 4480), 0),
    "down_proj 4480x15680": ((4480, 15680), 0),
    "up_proj 15680x4480": ((15680, 4480), 0),
    "lm_head rows 16384x4480": ((16384, 4480), 0),
    "experts 8x1856x2688": ((8, 1856, 2688), 512),   # per-expert H from the tokens routed to it
    "lm_head 131072x4480": ((131072, 4480), 0),
}
NEW_ONLY = {"lm_head 131072x4480"}   # the float64 reference would need ~20 GB (W, copies, D_g, D_r in float64)


# ---- the reference: mixq's gptq-v2 (numpy float64 on the host), as it was before the mlx port ----------

def ref_pack(q: np.ndarray, bits: int) -> np.ndarray:
    q = np.asarray(q, dtype=np.uint64)
    lead, n = q.shape[:-1], q.shape[-1]
    per = 32 // np.gcd(32, bits)
    words = per * bits // 32
    q = q.reshape(-1, n // per, per)
    out = np.zeros((q.shape[0], n // per, words), dtype=np.uint64)
    for j in range(per):
        w, off = divmod(j * bits, 32)
        out[:, :, w] |= (q[:, :, j] << np.uint64(off)) & np.uint64(0xFFFFFFFF)
        spill = off + bits - 32
        if spill > 0:
            out[:, :, w + 1] |= q[:, :, j] >> np.uint64(bits - spill)
    return out.reshape(*lead, n * bits // 32).astype(np.uint32)


def ref_round_to(x, dtype):
    import mlx.core as mx

    return np.array(mx.array(x.astype(np.float32)).astype(getattr(mx, dtype)).astype(mx.float32), dtype=np.float64)


def ref_inverse_cholesky(H, damp=0.01):
    cols = H.shape[0]
    H = H.astype(np.float64).copy()
    diag = np.diag(H).copy()
    if not np.any(diag > 0):
        return np.eye(cols)
    dead = diag <= 0
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    H[dead, dead] = 1.0
    H[np.diag_indices(cols)] += damp * float(np.mean(diag[~dead]))
    for extra in (0.0, 0.1, 1.0, 10.0):
        try:
            Hd = H + extra * float(np.mean(np.diag(H))) * np.eye(cols)
            return np.linalg.cholesky(np.linalg.inv(Hd)).T
        except np.linalg.LinAlgError:
            continue
    return np.eye(cols)


def ref_gptq_2d(W, U, bits, group, dtype, block=128):
    W = np.array(W, dtype=np.float64, copy=True)
    rows, cols = W.shape
    maxq = float(2 ** bits - 1)
    tiny = float(np.finfo(np.float16).tiny) if dtype == "float16" else 1e-30
    q_all = np.zeros((rows, cols), dtype=np.int64)
    S = np.zeros((rows, cols // group))
    B = np.zeros_like(S)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            g = c // group
            if c % group == 0:
                blk = W1[:, i:i + group]
                lo, hi = blk.min(axis=1), blk.max(axis=1)
                span = hi - lo
                sc = ref_round_to(np.where(span > 0, span / maxq, 1.0), dtype)
                S[:, g] = np.where(sc > 0, sc, tiny)
                B[:, g] = ref_round_to(lo, dtype)
            w = W1[:, i]
            q = np.clip(np.rint((w - B[:, g]) / S[:, g]), 0.0, maxq)
            q_all[:, c] = q.astype(np.int64)
            err = (w - (S[:, g] * q + B[:, g])) / U[c, c]
            W1[:, i:] -= np.outer(err, U[c, c:i2])
            E1[:, i] = err
        if i2 < cols:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return q_all, S, B


def ref_quantized(w, H, bits, group):
    """gptq-v2's Rounding.quantized: per slice, factor + solve, keep round-to-nearest where it is better."""
    import mlx.core as mx

    dtype = str(w.dtype).rsplit(".", 1)[-1]
    Wn = np.array(w.astype(mx.float32), dtype=np.float64)
    lead = Wn.shape[:-2]
    Wf = Wn.reshape(-1, *Wn.shape[-2:])
    Hf = H.reshape(-1, *H.shape[-2:]) if H.ndim == 3 else H[None]
    Us = [ref_inverse_cholesky(Hf[min(e, len(Hf) - 1)]) for e in range(Wf.shape[0])]
    rtn = mx.quantize(w, group_size=group, bits=bits, mode="affine")
    rtn_deq = np.array(mx.dequantize(*rtn, group_size=group, bits=bits, mode="affine", dtype=mx.float32),
                       dtype=np.float64).reshape(Wf.shape)
    qs, ss, bs, take_rtn = [], [], [], []
    for e in range(Wf.shape[0]):
        He = np.asarray(Hf[min(e, len(Hf) - 1)], dtype=np.float64)
        q, sc, b = ref_gptq_2d(Wf[e], Us[e], bits, group, dtype)
        D_g = Wf[e] - np.repeat(sc, group, 1) * q - np.repeat(b, group, 1)
        D_r = Wf[e] - rtn_deq[e]
        take_rtn.append(float(np.sum((D_g @ He) * D_g)) > float(np.sum((D_r @ He) * D_r)))
        qs.append(q), ss.append(sc), bs.append(b)
    shape = lambda a: a.reshape(*lead, *a.shape[-2:])  # noqa: E731
    out = [mx.array(shape(ref_pack(np.stack(qs), bits))),
           mx.array(shape(np.stack(ss)).astype(np.float32)).astype(w.dtype),
           mx.array(shape(np.stack(bs)).astype(np.float32)).astype(w.dtype)]
    if any(take_rtn):
        pick = mx.array(np.array(take_rtn).reshape(*lead, 1, 1)) if lead else mx.array(take_rtn[0])
        out = [mx.where(pick, r.astype(o.dtype), o) for r, o in zip(rtn, out)]
    return tuple(out)


# ---- one measured run per process ---------------------------------------------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(impl: str, folder: str, bits: int, group: int) -> None:
    import mlx.core as mx

    from mixq.core import blas
    from mixq.core.formats import Format
    from mixq.quant.rounding import Rounding

    w = mx.array(np.load(os.path.join(folder, "w.npy"))).astype(mx.bfloat16)
    H = np.load(os.path.join(folder, "h.npy"))   # float32, as mixq's Hessians hold them
    mx.eval(w)
    with open("/proc/self/clear_refs", "w") as f:   # restart the peak-RSS count from here
        f.write("5")
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if impl == "old":
        out = ref_quantized(w, H, bits, group)
    else:
        out = Rounding({"w": H}).quantized("w", w, Format.affine(bits, group), keep=False)
    mx.eval(*out)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    np.savez(os.path.join(folder, f"{impl}.npz"), *[np.array(a.astype(mx.float32) if i else a)
                                                    for i, a in enumerate(out)])
    print(json.dumps({"seconds": seconds, "peak_rss_mb": (peak - base) / 1024, "blas": blas.info()["status"]}))


# ---- parent: inputs, runs, scores -----------------------------------------------------------------------

def make_inputs(shape, routed: int, tokens: int, seed: int = 0):
    """bf16-valued weights with a few outlier rows; Hessians X^T X of correlated activations with uneven,
    heavy-tailed channel scales (a few outlier channels, as real hidden states have)."""
    rng = np.random.default_rng(seed)
    *lead, rows, cols = shape
    W = (rng.standard_normal(shape, dtype=np.float32) * 0.02
         * rng.lognormal(0, 0.3, size=(*lead, rows, 1)).astype(np.float32))
    n = routed or tokens

    def gram():
        basis = rng.standard_normal((64, cols), dtype=np.float32)
        X = rng.standard_normal((n, cols), dtype=np.float32) + rng.standard_normal((n, 64), dtype=np.float32) @ basis * 0.3
        X *= rng.lognormal(0, 1.0, size=cols).astype(np.float32)
        return X.T @ X

    H = np.stack([gram() for _ in range(lead[0])]) if lead else gram()
    import mlx.core as mx

    W = np.array(mx.array(W).astype(mx.bfloat16).astype(mx.float32))
    return W, H.astype(np.float32)


def output_error(W, deq, H, chunk: int = 2048) -> float:
    """sum over slices of tr(D H D^T), D = W - deq, in float64."""
    W3, D3 = W.reshape(-1, *W.shape[-2:]), deq.reshape(-1, *W.shape[-2:])
    H3 = H.reshape(-1, *H.shape[-2:])
    total = 0.0
    for e in range(W3.shape[0]):
        He = H3[min(e, len(H3) - 1)].astype(np.float64)
        for r in range(0, W3.shape[1], chunk):
            D = W3[e, r:r + chunk].astype(np.float64) - D3[e, r:r + chunk]
            total += float(np.sum((D @ He) * D))
    return total


def run_case(name: str, args, bits: int, group: int) -> dict:
    """Both implementations (or only the new one) on one case's saved inputs; the row to print."""
    import mlx.core as mx

    from mixq.core.formats import Format, quantize_dequantize

    shape, routed = CASES[name]
    impls = ("new",) if name in NEW_ONLY or args.new_only else ("old", "new")
    row: dict = {"case": name}
    with tempfile.TemporaryDirectory(prefix="mixq-gptq-") as folder:
        W, H = make_inputs(shape, routed, args.tokens)
        np.save(os.path.join(folder, "w.npy"), W)
        np.save(os.path.join(folder, "h.npy"), H)
        codes = {}
        for impl in impls:
            r = subprocess.run([sys.executable, __file__, "--child", impl, folder, "--format", args.format],
                               capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"{name} ({impl}): {r.stderr.strip()}")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            z = np.load(os.path.join(folder, f"{impl}.npz"))
            wq, sc, b = (mx.array(z[f"arr_{i}"]) for i in range(3))
            deq = np.array(mx.dequantize(wq, sc, b, group_size=group, bits=bits, dtype=mx.float32))
            row.update({f"{impl} s": res["seconds"], f"{impl} MB": res["peak_rss_mb"],
                        f"{impl} err": output_error(W, deq, H)})
            del deq
            codes[impl] = np.array(mx.dequantize(wq, mx.ones(sc.shape), mx.zeros(b.shape), group_size=group,
                                                 bits=bits, dtype=mx.float32)).astype(np.uint8)
        rtn = np.array(quantize_dequantize(mx.array(W).astype(mx.bfloat16), Format.affine(bits, group)))
        row["rtn err"] = output_error(W, rtn, H)
    if "old" in codes:
        row["x faster"] = row["old s"] / row["new s"]
        row["new/old"] = row["new err"] / row["old err"]
        row["same q"] = float(np.mean(codes["old"] == codes["new"]))
    return row


COLUMNS = [("case", 25, "{}"), ("old s", 8, "{:.1f}"), ("new s", 8, "{:.1f}"), ("x faster", 8, "{:.2f}"),
           ("old MB", 8, "{:.0f}"), ("new MB", 8, "{:.0f}"), ("old err", 11, "{:.5g}"), ("new err", 11, "{:.5g}"),
           ("new/old", 8, "{:.4f}"), ("rtn err", 11, "{:.5g}"), ("same q", 7, "{:.2%}")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="all", help="all, small, or comma-separated names from: " + ", ".join(CASES))
    ap.add_argument("--format", default="4:64", help="affine bits:group (default 4:64)")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration rows behind each dense Hessian")
    ap.add_argument("--new-only", action="store_true", help="skip the float64 reference (e.g. to time two mixq "
                    "versions: run this script with PYTHONPATH=<other checkout>/src)")
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    bits, group = (int(x) for x in args.format.split(":"))
    if args.child:
        child(args.child[0], args.child[1], bits, group)
        return 0
    names = {"all": [n for n in CASES if n != "small"], "small": ["small"]}.get(args.cases, args.cases.split(","))
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s): {', '.join(unknown)}", file=sys.stderr)
        return 2

    from mixq.core import blas

    print(f"mlx BLAS: {blas.info()['status']} {blas.info()['library']}; numpy: its bundled OpenBLAS")
    print(f"format {args.format}, dense Hessians from {args.tokens} random tokens; s = one whole Rounding.quantized; "
          f"MB = peak RSS above the loaded inputs; err = output error sum d H d^T (float64); same q = equal codes; "
          f"{', '.join(sorted(NEW_ONLY))}: new only")
    print(" ".join(f"{c:<{w}}" if c == "case" else f"{c:>{w}}" for c, w, _ in COLUMNS), flush=True)
    for name in names:
        try:
            row = run_case(name, args, bits, group)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        cells = [(f.format(row[c]) if c in row else "-") for c, _, f in COLUMNS]
        print(" ".join(f"{x:<{w}}" if c == "case" else f"{x:>{w}}" for x, (c, w, _) in zip(cells, COLUMNS)),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
